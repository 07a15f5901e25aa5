"""The ``lora-nodes`` command line: run, validate, nodes, inspect.

Each command imports the parts it needs when it runs, so ``lora-nodes --help`` does not wait for them.
``validate``, ``nodes`` and ``convert`` import no model library at all (torch, diffusers, numpy, PIL): the
node catalogue is declarations, and validation reads file headers only; ``run``, ``inspect`` and ``serve``
bring torch and diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from .engine.events import JsonLines, event, ignore
from .errors import NodeError
from .fileio import atomic_write_text
from .libraries import import_model_libraries
from .modelfolders import MODELS_DIR_VARIABLE, FolderSetupError, configured, using_folders
from .nodes import catalogue

if TYPE_CHECKING:
    from .cli_display import ProgressDisplay

EXAMPLES = """\
examples:
  lora-nodes run workflows/quickstart.yaml
  lora-nodes run workflows/quickstart.yaml --set star.path=my_style.safetensors
  lora-nodes run workflows/strength_sweep.yaml --sweep styled.strength_model=0,0.5,1
  lora-nodes run workflows/strength_sweep.yaml --sweep styled.strength_model=0,0.5,1 \
      --sweep images.seed=1,2 --workers 2   # a labelled grid; variants in 2 worker processes
  lora-nodes run comfy_prompt.json --models-dir ~/ComfyUI/models   # names such as style/foo.safetensors
  lora-nodes run outputs/quickstart/strength_1_00001.png   # re-run the workflow a PNG was made with
  lora-nodes validate workflows/quickstart.yaml --json
  lora-nodes nodes                                     # every node type and its inputs
  lora-nodes inspect builtin:tiny --json               # what a LoRA can target in a base
  lora-nodes inspect style.safetensors --base builtin:tiny
  lora-nodes convert workflows/quickstart.yaml --to comfyui-ui -o quickstart.json   # open in ComfyUI
  lora-nodes convert comfy_export.json --to yaml -o mine.yaml                     # and back
"""

EXIT_OK, EXIT_RUN_FAILED, EXIT_INVALID = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-nodes", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Run LoRA node-graph workflows (YAML, JSON, ComfyUI API format, or a PNG we wrote) headless.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a workflow", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Validate a workflow, then run the nodes its outputs need.\n"
                         "Exit codes: 0 done, 1 a node failed, 2 the workflow is invalid.", epilog=EXAMPLES)
    run.add_argument("file", help="workflow file: .yaml, .json (ours or ComfyUI API format) or .png")
    _add_override_args(run)
    _add_sweep_arg(run)
    _add_sweep_run_args(run)
    run.add_argument("--output-dir", default="outputs", help="where output files go (default: ./outputs)")
    run.add_argument("--cache-dir", default=None, help="disk cache for expensive results (default: ~/.cache/lora-nodes)")
    run.add_argument("--events", choices=["jsonl"], help="print run events as JSON lines on stdout instead of bars")
    _add_folder_args(run)
    run.add_argument("--debug", action="store_true", help="show the full traceback when a node fails")
    run.add_argument("--no-memory-check", action="store_true",
                     help="run Sample and TrainLoRA even when their memory estimate exceeds what is free")

    validate = sub.add_parser("validate", help="check a workflow without running it (exit 0 valid, 2 invalid)")
    validate.add_argument("file")
    _add_override_args(validate)
    _add_sweep_arg(validate)
    _add_sweep_run_args(validate)  # accepted so that a run command validates as it is (they change no check)
    _add_folder_args(validate)
    validate.add_argument("--json", action="store_true", help="print the problems as a JSON list")

    nodes = sub.add_parser("nodes", help="list node types with their inputs and outputs")
    nodes.add_argument("--json", action="store_true", help="the catalogue in ComfyUI's /object_info shape")

    convert = sub.add_parser("convert", help="convert a workflow between our format and ComfyUI's",
                             description="Convert between YAML, JSON, ComfyUI API format and ComfyUI editor "
                             "(UI) format. Node positions travel in our format's optional 'ui:' block.")
    convert.add_argument("file", help="workflow file: .yaml, .json (ours, ComfyUI API or UI format) or .png")
    convert.add_argument("--to", required=True, choices=["yaml", "json", "comfyui-api", "comfyui-ui"])
    convert.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    _add_folder_args(convert, "files in these folders are written by their name there")

    inspect = sub.add_parser("inspect", help="describe a base model, a LoRA file, or what a PNG's chunks say")
    inspect.add_argument("source", help="builtin:NAME, a diffusers folder, a checkpoint, a LoRA file, "
                                         "or a PNG (ours, ComfyUI's or A1111's)")
    inspect.add_argument("--base", help="with a LoRA: the base to place it on (shows what fits and what not)")
    inspect.add_argument("--config", default="", help="configs+tokenizer folder for a single-file checkpoint")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    _add_folder_args(inspect)
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    """``lora-nodes serve``: the web editor (ComfyUI's, installed with lora-nodes[editor]) on our engine."""
    serve = sub.add_parser("serve", help="build and run graphs in ComfyUI's web editor, served by our engine",
                           description="Serve ComfyUI's web editor (pip install 'lora-nodes[editor]') with a queue "
                           "that runs prompts on our engine. Listens on 127.0.0.1 only unless --host says otherwise; "
                           "another address needs a token (given with --token, or generated and printed).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8188, help="port (default: 8188)")
    serve.add_argument("--token", help="required on every request (default: none on 127.0.0.1, a generated one "
                       "on other addresses)")
    serve.add_argument("--output-dir", default="outputs", help="where output files go (default: ./outputs)")
    serve.add_argument("--user-dir", default="user", help="settings, saved workflows and the history (default: ./user)")
    serve.add_argument("--cache-dir", default=None, help="disk cache for expensive results (default: ~/.cache/lora-nodes)")
    _add_folder_args(serve)


def _add_override_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input; VALUE is YAML (0.5, true, 'text', [node, output])")


def _add_folder_args(parser: argparse.ArgumentParser, why: str = "") -> None:
    """--models-dir, --extra-model-paths and --input-dir: where model files and input images are found by name."""
    also = f"; {why}" if why else ""
    group = parser.add_argument_group(
        "model folders", "A file input that is not an existing path (relative to the workflow, or absolute) is "
        "looked up by name, subfolders included (style/foo.safetensors), in the folders of its kind, as "
        f"ComfyUI looks it up{also}.")
    group.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                       help="a folder laid out as ComfyUI's models/ (checkpoints/, loras/, vae/, diffusion_models/ "
                       "or unet/, text_encoders/ or clip/, diffusers/); repeat to search several, in order "
                       f"(default: ${MODELS_DIR_VARIABLE}, several separated by '{os.pathsep}', else ./models "
                       "when it exists)")
    group.add_argument("--extra-model-paths", action="append", default=[], metavar="FILE",
                       help="a ComfyUI extra_model_paths.yaml: its folders are searched after --models-dir's "
                       "(sections marked is_default: true, first); repeatable (default: none)")
    group.add_argument("--input-dir", metavar="DIR",
                       help="where LoadImage finds images by name, as ComfyUI's input/ folder "
                       "(default: ./input when it exists)")


def _add_sweep_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", action="append", default=[], metavar="NODE.INPUT=V1,V2,...",
                        help="one variant per value (repeat for the cartesian product); shared nodes run once. "
                        "VALUE '*': every choice (samplers); a folder for a file input: every model file in it; "
                        "NODE.INPUT:replace=FIND,R1,R2: replace FIND in the text (prompt S/R); a wildcard "
                        "input (stack.strength_model_*) sets every input it matches")


def _add_sweep_run_args(parser: argparse.ArgumentParser) -> None:
    """How ``run`` shows and spreads a sweep: its grids, worker processes, a Ray cluster."""
    group = parser.add_argument_group("sweeps", "A --sweep run also writes one labelled grid per sweep (the "
                                      "first --sweep across, the second down, one grid per value of further ones).")
    group.add_argument("--no-grid", action="store_true", help="write the variants' images only, no grid")
    group.add_argument("--workers", type=int, default=0, metavar="N",
                       help="run variants in N worker processes, each loading the base once (one GPU each where "
                       "there are GPUs); with --ray: N Ray actors (default: one per GPU, else one per CPU)")
    group.add_argument("--ray", metavar="ADDRESS",
                       help="run variants on the Ray cluster at ADDRESS ('auto', 'ray://host:10001'), or 'local' "
                       "to start one here (needs pip install 'lora-nodes[ray]')")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lora-nodes`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    handler = {"run": cmd_run, "validate": cmd_validate, "nodes": cmd_nodes, "inspect": cmd_inspect,
               "convert": cmd_convert, "serve": cmd_serve}[args.command]
    try:
        with _model_folders(args):
            return handler(args)
    except FolderSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted; files already written were kept", file=sys.stderr)
        return 130


def _model_folders(args: argparse.Namespace) -> AbstractContextManager:
    """The model folders a command's options (and the environment, and ./models) name, in force while it runs."""
    if not hasattr(args, "models_dir"):
        return nullcontext()
    return using_folders(configured(args.models_dir, args.extra_model_paths, args.input_dir))


def _quiet_libraries() -> None:
    """Keep library chatter (deprecations, optional-backend notes) out of the CLI's output."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _load(args: argparse.Namespace):
    """The workflow of ``args.file`` with ``--set`` applied, and the sweep variants."""
    from .graph.overrides import sweep_variants

    workflow, sweeps = _load_with_sweeps(args)
    return workflow, sweep_variants(sweeps)


def _load_with_sweeps(args: argparse.Namespace):
    """The workflow of ``args.file`` with ``--set`` applied, and its sweeps (each a list of overrides).

    Without ``--sweep``, the sweeps a workflow records under its ``sweep`` key (a grid PNG does) are run.
    """
    from .engine.sweep_grids import SWEEP_KEY
    from .graph import Problem, WorkflowError, load_workflow
    from .graph.overrides import apply_overrides, expand_sweeps, parse_set, parse_sweep

    workflow = load_workflow(args.file)
    recorded = workflow.extra.pop(SWEEP_KEY, [])  # the variants' own PNGs must not record the sweep
    if not (isinstance(recorded, list) and all(isinstance(text, str) for text in recorded)):
        raise WorkflowError([Problem("bad_override", f"the workflow's '{SWEEP_KEY}' key must be a list of "
                                     "--sweep arguments (NODE.INPUT=V1,V2,...)")])
    sets = [parse_set(text) for text in args.set]
    workflow = apply_overrides(workflow, sets, catalogue(), Path.cwd())
    sweeps = [parse_sweep(text) for text in (args.sweep or recorded)]
    return workflow, expand_sweeps(workflow, sweeps, catalogue(), Path.cwd())


def _print_problems(problems, as_json: bool, stream=None) -> None:
    stream = stream or sys.stderr
    if as_json:
        print(json.dumps([p.to_dict() for p in problems], indent=2), file=stream)
        return
    print(f"The workflow has {len(problems)} problem{'s' * (len(problems) != 1)}:", file=stream)
    for problem in problems:
        print(f"  {problem}", file=stream)
    print("Fix them and run again ('lora-nodes nodes' lists every node's inputs).", file=stream)


def cmd_validate(args: argparse.Namespace) -> int:
    from .graph import WorkflowError
    from .graph.overrides import bind_variants

    problems = []
    try:
        workflow, variants = _load(args)
        bind_variants(workflow, variants, catalogue(), Path.cwd())
    except WorkflowError as exc:
        problems = exc.problems
    if args.json:
        print(json.dumps([p.to_dict() for p in problems], indent=2))
    elif problems:
        _print_problems(problems, False)
    else:
        print(f"{args.file}: valid ({len(workflow.nodes)} nodes)")
    return EXIT_INVALID if problems else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .cli_display import ProgressDisplay
    from .engine.scheduler import RunFailed, Runner
    from .graph import WorkflowError

    jsonl = args.events == "jsonl"
    display = None if jsonl else ProgressDisplay()
    emit = JsonLines(sys.stdout) if jsonl else display
    output_dir, main_process = args.output_dir, int(os.environ.get("RANK", "0")) == 0
    if not main_process:  # under `accelerate launch`: one process writes files and reports, the others train
        output_dir, emit, display = tempfile.mkdtemp(prefix="lora-nodes-rank"), ignore, None
    started = time.perf_counter()
    if args.sweep or args.workers or args.ray:
        return _run_sweep(args, output_dir, emit, display, started)
    try:
        workflow, variants = _load(args)
        import_model_libraries()  # after validation: a workflow with problems is told at once
        runner = Runner(output_dir=output_dir, cache_dir=args.cache_dir, emit=emit, main_process=main_process,
                        check_memory=not args.no_memory_check, one_shot=True)
        runner.run_variants(workflow, variants, cwd=Path.cwd())
    except WorkflowError as exc:
        if jsonl:
            emit(event("invalid", problems=[p.to_dict() for p in exc.problems]))
        else:
            _print_problems(exc.problems, False)
        return EXIT_INVALID
    except RunFailed as exc:
        if args.debug:
            traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
        if not jsonl:
            print("Files written before the failure were kept." + ("" if args.debug else
                  " Add --debug for the full traceback."), file=sys.stderr)
        return EXIT_RUN_FAILED
    if display is not None:
        print(display.summary(time.perf_counter() - started))
    return EXIT_OK


def _run_sweep(args: argparse.Namespace, output_dir: str, emit, display: ProgressDisplay | None,
               started: float) -> int:
    """A sweep: every variant (serially, in --workers processes or on --ray), then its grids."""
    from .engine.sweep_grids import write_sweep_grids
    from .engine.workers import RunnerOptions, run_sweep
    from .graph import WorkflowError
    from .graph.overrides import sweep_variants

    sink = emit if display is None or not (args.workers or args.ray) else _ParallelDisplay(display)
    try:
        workflow, sweeps = _load_with_sweeps(args)
        import_model_libraries()
        outcomes = run_sweep(workflow, sweep_variants(sweeps), output_dir,
                             RunnerOptions(args.cache_dir, not args.no_memory_check), sink, Path.cwd(),
                             workers=args.workers, ray_address=args.ray)
    except WorkflowError as exc:
        if display is None:
            emit(event("invalid", problems=[p.to_dict() for p in exc.problems]))
        else:
            _print_problems(exc.problems, False)
        return EXIT_INVALID
    except NodeError as exc:  # --ray without Ray installed
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    grids = [] if args.no_grid else write_sweep_grids(workflow, sweeps, outcomes, output_dir, catalogue())
    if grids:
        emit(event("grid", files=grids))
    failed = [o for o in outcomes if not o.ok]
    if display is not None:
        display.files += grids
        for outcome in failed:
            where = f"node '{outcome.error['node']}' ({outcome.error['type']}): " if outcome.error["node"] else ""
            print(f"variant {outcome.label} failed: {where}{outcome.error['message']}", file=sys.stderr)
        print(display.summary(time.perf_counter() - started))
        if grids:
            print("grid" + "s" * (len(grids) > 1) + ": " + ", ".join(grids))
    if failed:
        if display is not None:
            print(f"{len(failed)} of {len(outcomes)} variants failed; the others' files were written.",
                  file=sys.stderr)
        return EXIT_RUN_FAILED
    return EXIT_OK


class _ParallelDisplay:
    """The progress display for variants running side by side: a line per node and per variant done
    (bars of several variants at once would overwrite each other)."""

    def __init__(self, display: ProgressDisplay):
        self.display = display

    def __call__(self, ev: dict) -> None:
        if ev["event"] in ("executing", "progress", "run_start"):
            return
        if ev["event"] == "variant_end":
            self.display.files += ev["files"]
            state = "done" if ev["ok"] else "failed"
            print(f"[{ev['done']}/{ev['total']}] variant {ev['variant']} {state} in {ev['seconds']:.1f}s"
                  f" ({ev['worker']})", file=sys.stderr, flush=True)
            return
        self.display(ev)


def cmd_convert(args: argparse.Namespace) -> int:
    from .graph import WorkflowError, load_workflow
    from .graph.convert import convert
    from .graph.validate import rebase_paths

    try:
        workflow = load_workflow(args.file)
        # files in a models folder go by their name; with -o, other relative paths are rebased to its folder
        workflow = rebase_paths(workflow, catalogue(), Path(args.output).resolve().parent if args.output else None)
        text = convert(workflow, args.to, catalogue())
    except WorkflowError as exc:
        _print_problems(exc.problems, False)
        return EXIT_INVALID
    if args.output:
        try:
            atomic_write_text(args.output, text)
        except OSError as exc:  # the workflow was fine; where it was to go is not
            print(f"error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_RUN_FAILED
        print(f"wrote {args.output} ({args.to})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    from .comfyui.object_info import catalogue_object_info
    from .nodes.spec import Catalogue

    ours = [spec for spec in catalogue().values() if not spec.comfy_core]
    core = [spec for spec in catalogue().values() if spec.comfy_core]
    if args.json:  # our pack's /object_info: ComfyUI describes its own core nodes itself
        print(json.dumps(catalogue_object_info(Catalogue(ours)), indent=2))
        return EXIT_OK
    print("lora-nodes' own nodes (inside ComfyUI their ids start with 'lora-nodes.'):\n")
    for spec in ours:
        _print_node(spec)
    if core:
        print("ComfyUI core nodes that run headless (their ComfyUI ids, inputs and outputs; "
              "in ComfyUI they are ComfyUI's own):\n")
        for spec in core:
            _print_node(spec)
    return EXIT_OK


def _print_node(spec) -> None:
    """One node type as `lora-nodes nodes` lists it: a title line, its description, inputs and outputs."""
    print(f"{spec.id}  ({spec.display_name}, {spec.category}, v{spec.version})")
    print(f"    {spec.description.splitlines()[0] if spec.description else ''}")
    for decl in spec.inputs:
        default = "" if decl.required or decl.optional else f" = {decl.default!r}"
        kind = "|".join(decl.choices) if decl.choices else decl.type
        flag = " (optional)" if decl.optional else ""
        print(f"    in  {decl.name}: {kind}{default}{flag}")
    for out in spec.outputs:
        print(f"    out {out.name}: {out.type}")
    print()


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import format_inspection, inspect_source

    try:
        info = inspect_source(args.source, args.base, args.config)
    except (NodeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.main import serve

    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
