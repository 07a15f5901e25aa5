"""Typed node declarations: the single source of truth for every node.

A node is one function plus one :class:`NodeSpec`. Validation, the ``nodes`` catalogue, the
ComfyUI class attributes and the cache keys are all derived from the spec, never written twice.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Annotated, Any, get_args, get_origin, get_type_hints

# Literal (widget) types, named as ComfyUI names them.
INT, FLOAT, STRING, BOOLEAN, COMBO = "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"
LITERAL_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})

# Value types passed between nodes. Ours carry our own names so that they never connect to
# ComfyUI's MODEL or CLIP by mistake; IMAGE is ComfyUI's ([batch, height, width, 3] float32 in 0..1).
MODEL, LORA, LORA_STACK, IMAGE = "LN_MODEL", "LN_LORA", "LN_LORA_STACK", "IMAGE"
DATASET = "LN_DATASET"
# ComfyUI's own value types, used by the ComfyUI core nodes we run headless (``nodes.core``): inside
# this vocabulary MODEL is a recipe over a base, CLIP a text-encoding view of one, VAE the base's VAE.
CORE_MODEL, CLIP, VAE, CONDITIONING, LATENT = "MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT"
MASK = "MASK"  # ComfyUI's mask type: [batch, height, width] float32, 1 where the image was transparent

MAX_SEED = 2**64 - 1  # the largest seed an input accepts (Sample's, TrainLoRA's)

CATEGORY_ROOT = "lora-nodes"
# In ComfyUI our node ids carry this prefix so they never collide with core nodes or other packs
# (ComfyUI has SaveImage, LoraLoader, SaveLoRA ...). Our files accept both spellings.
COMFY_PREFIX = "lora-nodes."


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Input:
    """One declared input. Link inputs carry a value type; literal inputs a widget type.

    Declared in a node function's signature, ``rank: Annotated[int, Input(INT, min=1)] = 8``:
    :func:`node` fills in ``name`` and ``default`` from the parameter, so neither is given here.
    """

    # keyword-only, so that a declaration starts with the type; first, so fields and repr keep their order
    name: str = field(default="", kw_only=True)
    type: str
    default: Any = REQUIRED
    description: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # may be left out entirely (no default is taken)
    path: bool = False  # a file or folder path: resolved, checked and fingerprinted
    path_kind: str = "any"  # with path: "file", "folder" or "any" (either); nothing else is accepted
    writes: bool = False  # a path the node writes under the output folder: checked before anything runs
    builtins: tuple[str, ...] = ()  # ``builtin:`` names this path input also accepts
    # with path: a kind of ComfyUI models folder ("loras", "checkpoints", "vae", "diffusion_models", "text_encoders",
    # "diffusers"; "input" for images): a value that is no existing path is found by name in that kind's folders
    # (lora_nodes.modelfolders), and written back as that name; inside ComfyUI its files are offered as choices.
    # With writes: inside ComfyUI the node writes under that kind's first models folder, not the output folder
    # (SaveLoRA's files into models/loras, where LoadLoRA lists them)
    folder: str | None = None
    multiline: bool = False
    in_key: bool = True  # False: changes how the work is done, not its result (left out of the cache key)
    content_key: bool = False  # a path keyed by its files' names, sizes and contents only (not where or when)
    # an INT named seed/noise_seed that ComfyUI's editor should follow with its control_after_generate widget
    # ("randomize" ...); False where a new seed each queue would redo the work (TrainLoRA's): no control widget
    seed_control: bool = True

    @property
    def is_link(self) -> bool:
        return self.type not in LITERAL_TYPES

    @property
    def required(self) -> bool:
        return self.default is REQUIRED and not self.optional


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    description: str = ""


@dataclass
class Preflight:
    """What a node can tell before anything runs, from its literal inputs and its inputs' facts.

    ``facts`` describe the node's outputs to the nodes downstream (e.g. ``{"family": ...}`` of a
    model or a LoRA); ``problems`` are ``(code, input name or None, message)``. A preflight reads
    at most a file's header: it must be cheap, and it never raises for bad input (it reports it).
    """

    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[tuple[str, str | None, str]] = field(default_factory=list)


# preflight(literals, upstream) -> Preflight, where upstream maps each linked input name to the
# facts of the node it links to (an empty dict when that node told nothing).
PreflightCheck = Callable[[dict[str, Any], dict[str, dict[str, Any]]], Preflight]


@dataclass(frozen=True)
class NodeSpec:
    """Everything there is to know about a node type, and the function that runs it."""

    id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    run: Callable[..., Any] = field(compare=False, repr=False)
    version: int = 1
    output_node: bool = False
    # results also kept on disk, so a new process need not redo them: an object with
    # ``save(outputs, folder)`` and ``load(folder) -> outputs``
    disk_cache: Any = None
    preflight: PreflightCheck | None = field(default=None, compare=False, repr=False)
    # one of ComfyUI's own nodes, run headless on our engine: keeps ComfyUI's id (no prefix) and is
    # never registered in the ComfyUI pack (ComfyUI has it already)
    comfy_core: bool = False

    @property
    def comfy_id(self) -> str:
        """The id this node has inside ComfyUI (namespaced, except ComfyUI's own core nodes)."""
        return self.id if self.comfy_core else COMFY_PREFIX + self.id

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def output_index(self, output: str | int) -> int | None:
        """Index of an output given by name or position, or None when there is no such output."""
        if isinstance(output, bool):
            return None
        if isinstance(output, int):
            return output if 0 <= output < len(self.outputs) else None
        names = [o.name for o in self.outputs]
        return names.index(output) if output in names else None


def node(
    id: str,
    *,
    display_name: str,
    category: str,
    outputs: tuple[Output, ...] | list[Output] = (),
    version: int = 1,
    output_node: bool = False,
    disk_cache: Any = None,
    preflight: PreflightCheck | None = None,
    comfy_core: bool = False,
) -> Callable[[Callable[..., Any]], NodeSpec]:
    """Declare a node: decorates its run function (``fn(ctx, **inputs)``) and returns the spec.

    The function's parameters after ``ctx`` are the node's inputs, in order. Each is annotated
    ``Annotated[type, Input(...)]``; its name is the input's name and its default the input's
    default (no default: required). ``comfy_core``: one of ComfyUI's own nodes (its id, inputs and
    category as ComfyUI has them; see :attr:`NodeSpec.comfy_core`). An ``optional=True`` input whose
    parameter defaults to None has no default: left out, the function gets None. A parameter annotated with a dataclass whose
    fields are declared the same way is a group: its fields are inputs at that place, in field
    order, and the function gets the dataclass built from them (callers still pass every input by
    its own name). The docstring becomes the node's description. The function returns a tuple
    with one value per declared output (or ``None`` for a node without outputs).
    """

    def declare(fn: Callable[..., Any]) -> NodeSpec:
        inputs, groups = _signature_inputs(id, fn)
        return NodeSpec(
            id=id,
            display_name=display_name,
            category=category if comfy_core else f"{CATEGORY_ROOT}/{category}",
            description=inspect.getdoc(fn) or "",
            inputs=inputs,
            outputs=tuple(outputs),
            run=_with_groups(fn, groups, [i.name for i in inputs]) if groups else fn,
            version=version,
            output_node=output_node,
            disk_cache=disk_cache,
            preflight=preflight,
            comfy_core=comfy_core,
        )

    return declare


class _TypeCheckingName(type):
    """What a name stands for in a node's annotations when its module imports it only for type checking.

    Node modules import the types their values have (``torch.Tensor``, ``ModelRecipe``, ...) under
    ``if TYPE_CHECKING:`` so that declaring the nodes (validation, ``lora-nodes nodes``) does not import
    torch; a declaration needs only each annotation's :class:`Input`, so such a name evaluates to a
    stand-in class: ``name | None``, ``tuple[name, ...]``, ``name.attribute`` and ``name[...]`` all work.
    """

    def __getattr__(cls, attribute: str) -> Any:
        if attribute.startswith("__"):  # typing probes dunders (``__origin__`` ...): a stand-in has none
            raise AttributeError(attribute)
        return _TypeCheckingName(f"{cls.__name__}.{attribute}", (), {})

    def __getitem__(cls, item: Any) -> Any:
        return cls

    def __repr__(cls) -> str:
        return f"<name for type checking only: {cls.__name__}>"


class _AnnotationNames(dict):
    """Names an annotation is evaluated with (as ``eval``'s locals): a name its module imports only under
    ``TYPE_CHECKING`` as a :class:`_TypeCheckingName`; any other is looked up as usual (after this mapping:
    the module's globals, the builtins), so a name defined nowhere is still a NameError."""

    def __init__(self, module: str):
        super().__init__()
        self.type_checking = _type_checking_names(module)

    def __missing__(self, name: str) -> Any:
        if name not in self.type_checking:
            raise KeyError(name)  # eval goes on to the module's globals and the builtins
        return _TypeCheckingName(name, (), {})


@functools.cache
def _type_checking_names(module: str) -> frozenset[str]:
    """The names ``module`` imports in its ``if TYPE_CHECKING:`` blocks, read from its source."""
    try:
        source = inspect.getsource(sys.modules[module])
    except (KeyError, OSError, TypeError):  # no such module, or no source to read
        return frozenset()
    names: set[str] = set()
    for block in re.finditer(r"^if TYPE_CHECKING:.*\n((?:[ \t]+.*\n|[ \t]*\n)+)", source, re.MULTILINE):
        for statement in ast.walk(ast.parse("if True:\n" + block.group(1))):
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).split(".")[0] for alias in statement.names)
    return frozenset(names)


def _hints(node_id: str, owner: Any) -> dict[str, Any]:
    """The evaluated annotations of a function or dataclass (its module's names resolve them; a function's
    may also use names imported only under ``TYPE_CHECKING``, see :class:`_TypeCheckingName`)."""
    try:
        if inspect.isfunction(owner):
            return get_type_hints(owner, localns=_AnnotationNames(owner.__module__), include_extras=True)
        return get_type_hints(owner, include_extras=True)
    except Exception as exc:  # any failure to evaluate: name the node it declares
        raise TypeError(f"node {node_id}: the annotations of {owner.__qualname__} do not evaluate "
                        f"({type(exc).__name__}: {exc}); every name they use must be defined at the top of "
                        f"module {owner.__module__} (a node function's types may be imported under TYPE_CHECKING)"
                        ) from exc


def _signature_inputs(node_id: str, fn: Callable[..., Any]) -> tuple[tuple[Input, ...], dict[str, type]]:
    """The inputs ``fn``'s parameters after ``ctx`` declare, and its groups (parameter -> dataclass)."""
    hints = _hints(node_id, fn)
    inputs: list[Input] = []
    groups: dict[str, type] = {}
    for param in list(inspect.signature(fn).parameters.values())[1:]:
        hint = hints.get(param.name)
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"node {node_id}: parameter '{param}' declares no input; "
                            "write each input as its own Annotated parameter")
        field_hints = _group_hints(node_id, hint)
        if field_hints is not None:
            if param.default is not param.empty:
                raise TypeError(f"node {node_id}: group '{param.name}' takes no default (its fields have theirs)")
            groups[param.name] = hint
            for item in fields(hint):
                if item.default_factory is not MISSING:
                    raise TypeError(f"node {node_id}: field '{item.name}' of {hint.__name__} has a default_factory; "
                                    "an input's default is a plain value")
                inputs.append(_declared(node_id, item.name, field_hints.get(item.name), item.default,
                                        f"field '{item.name}' of {hint.__name__}"))
        else:
            inputs.append(_declared(node_id, param.name, hint, param.default, f"parameter '{param.name}'"))
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise TypeError(f"node {node_id}: inputs {names} repeat a name (a group's field is also a parameter?)")
    return tuple(inputs), groups


def _group_hints(node_id: str, hint: Any) -> dict[str, Any] | None:
    """The evaluated field annotations of ``hint`` when it is a group (a dataclass with a field declaring
    an Input), else None: a parameter typed with some other dataclass is an undeclared parameter."""
    if not (isinstance(hint, type) and is_dataclass(hint)):
        return None
    hints = _hints(node_id, hint)
    declares = any(get_origin(h) is Annotated and any(isinstance(m, Input) for m in get_args(h)[1:])
                   for h in hints.values())
    return hints if declares else None


def _declared(node_id: str, name: str, hint: Any, default: Any, where: str) -> Input:
    """The Input that ``hint`` (``Annotated[type, Input(...)]``) declares, named ``name``, with ``default``."""
    declared = [m for m in get_args(hint)[1:] if isinstance(m, Input)] if get_origin(hint) is Annotated else []
    if len(declared) != 1:
        raise TypeError(f"node {node_id}: {where} declares no input: annotate it as Annotated[type, Input(...)] "
                        "(or with a dataclass of such fields, a group)")
    decl = declared[0]
    undefined = [value for item in fields(decl) for value in _flat(getattr(decl, item.name))
                 if isinstance(value, _TypeCheckingName)]
    if undefined:  # a stand-in stands for a type, never for a value
        raise TypeError(f"node {node_id}: {where} declares its input with {undefined[0].__name__}, which its module "
                        "imports only under TYPE_CHECKING")
    if decl.name or decl.default is not REQUIRED:
        raise TypeError(f"node {node_id}: {where} gives a name or default in Input(...); they come from the "
                        "parameter (its name, its default)")
    if default is inspect.Parameter.empty or default is MISSING:
        default = REQUIRED
    elif default is None:
        if not decl.optional:
            raise TypeError(f"node {node_id}: {where} defaults to None; an input that may be left out is "
                            "declared optional=True")
        default = REQUIRED  # an optional input has no default: left out, the function gets None
    return replace(decl, name=name, default=default)


def _flat(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,)


def _with_groups(fn: Callable[..., Any], groups: dict[str, type], names: list[str]) -> Callable[..., Any]:
    """``fn`` called as every node is, ``(ctx, *inputs)`` or ``(ctx, **inputs)`` by input name, with each
    group's inputs built into its dataclass first (a group input left out takes the field's default)."""

    @functools.wraps(fn)
    def run(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(names) or set(names[:len(args)]) & set(kwargs):
            raise TypeError(f"{fn.__qualname__}: inputs given twice, or more than {len(names)} inputs")
        values = {**dict(zip(names, args)), **kwargs}
        for param, group in groups.items():
            values[param] = group(**{f.name: values.pop(f.name) for f in fields(group) if f.name in values})
        return fn(ctx, **values)

    return run


class Catalogue(Mapping[str, NodeSpec]):
    """The node types a workflow may use, by id (short, or namespaced as in ComfyUI)."""

    def __init__(self, specs: list[NodeSpec]):
        self._specs = {s.id: s for s in specs}
        if len(self._specs) != len(specs):
            raise ValueError("two node specs share an id")

    def __getitem__(self, key: str) -> NodeSpec:
        if isinstance(key, str) and key.startswith(COMFY_PREFIX):
            spec = self._specs[key.removeprefix(COMFY_PREFIX)]
            if spec.comfy_core:  # ComfyUI's own nodes have no namespaced id
                raise KeyError(key)
            return spec
        return self._specs[key]

    def __iter__(self):
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)
