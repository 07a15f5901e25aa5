"""Model folders: files found by name, as ComfyUI finds them, so workflows carry names, not paths.

A models folder is laid out as ComfyUI's ``models/``: one subfolder per kind of file (``checkpoints``,
``loras``, ``vae``, ``diffusion_models`` or its old name ``unet``, ``text_encoders`` or ``clip``,
``diffusers``). A path input declared with a ``folder`` kind (:attr:`lora_nodes.nodes.spec.Input.folder`)
whose value is not an existing path is looked up by name in that kind's folders, subfolders included
(``style/foo.safetensors``), the first folder that has it winning. Images for ComfyUI's LoadImage are
the ``input`` kind: one folder, ComfyUI's ``input/``.

Where the folders come from (:func:`configured`, which the command line calls): ``--models-dir``, else
the environment variable :data:`MODELS_DIR_VARIABLE`, else ``./models`` when it exists; then the
folders of ComfyUI's ``extra_model_paths.yaml`` files (:func:`read_extra_model_paths`). The active
folders are held in a context variable (:func:`using_folders`), so library code and the tests choose
them for a block of work without passing them through every layer.
"""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from .paths import cut, scan_tree

MODELS_DIR_VARIABLE = "LORA_NODES_MODELS_DIR"  # one or more models folders, separated by os.pathsep
DEFAULT_MODELS_DIR = "models"  # used, relative to where the command runs, when it exists
DEFAULT_INPUT_DIR = "input"  # ComfyUI's folder of input images, likewise
INPUT = "input"  # the kind of LoadImage's files: images in the input folder, not a models subfolder
# ComfyUI's old names for two kinds (its extra_model_paths.yaml files and nodes still use them)
ALIASES = {"unet": "diffusion_models", "clip": "text_encoders"}
# Each kind's subfolders in a models folder, as ComfyUI lays it out (a renamed kind: both names).
LAYOUT: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "loras": ("loras",),
    "vae": ("vae",),
    "diffusion_models": ("unet", "diffusion_models"),  # searched in ComfyUI's order
    "text_encoders": ("text_encoders", "clip"),
    "diffusers": ("diffusers",),
}
# A name not found in its own kind is also looked for in these: a base is a checkpoint file or a diffusers folder.
ALSO_SEARCHED: dict[str, tuple[str, ...]] = {"checkpoints": ("diffusers",)}
FOLDER_KINDS = frozenset({"diffusers"})  # kinds whose entries are folders (diffusers pipelines), not files
DIFFUSERS_MARKER = "model_index.json"  # a diffusers pipeline folder holds this file
# The files listed when near names are sought (any named file is still found): ComfyUI's model
# extensions, and the images an input folder holds.
MODEL_SUFFIXES = frozenset({".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".gguf"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LISTING_LIMIT = 20_000  # entries listed per folder when looking for near names: a wrong --models-dir ("/") stays quick
NEAR_NAMES = 5  # how many near names a problem lists
ANNOTATION = " [input]"  # ComfyUI marks a file of its input folder so in some values ("x.png [input]")


class FolderSetupError(ValueError):
    """Model folders asked for that cannot be used: a folder that does not exist, an unreadable yaml file."""


def canonical_kind(kind: str) -> str:
    """A kind under its current ComfyUI name (``unet`` -> ``diffusion_models``, ``clip`` -> ``text_encoders``)."""
    return ALIASES.get(kind, kind)


@dataclass(frozen=True)
class ModelFolders:
    """The folders searched for each kind, in order (kinds under their canonical names)."""

    kinds: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)

    def of(self, kind: str) -> tuple[Path, ...]:
        """The folders of ``kind`` (an alias is accepted), first searched first."""
        return self.kinds.get(canonical_kind(kind), ())

    def searched(self, kind: str) -> tuple[tuple[str, Path], ...]:
        """(kind, folder) in the order a name of ``kind`` is looked for: its own, then :data:`ALSO_SEARCHED`."""
        kind = canonical_kind(kind)
        return tuple((k, folder) for k in (kind, *ALSO_SEARCHED.get(kind, ())) for folder in self.of(k))

    def __bool__(self) -> bool:
        return any(self.kinds.values())


class _Builder:
    """Collects folders per kind: appended, or put first (ComfyUI's ``is_default``), each once."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[Path]] = {}

    def add(self, kind: str, folder: Path, first: bool = False) -> None:
        folders = self.kinds.setdefault(canonical_kind(kind), [])
        if folder in folders:
            if not first:
                return
            folders.remove(folder)
        if first:
            folders.insert(0, folder)
        else:
            folders.append(folder)

    def add_models_dir(self, root: Path) -> None:
        for kind, subfolders in LAYOUT.items():
            for name in subfolders:
                self.add(kind, root / name)

    def build(self) -> ModelFolders:
        return ModelFolders({kind: tuple(folders) for kind, folders in self.kinds.items() if folders})


def models_dir_folders(root: str | Path) -> ModelFolders:
    """The folders of one models folder laid out as ComfyUI's ``models/`` (whether each exists or not)."""
    builder = _Builder()
    builder.add_models_dir(_absolute(root))
    return builder.build()


def read_extra_model_paths(file: str | Path) -> list[tuple[str, Path, bool]]:
    """The folders a ComfyUI ``extra_model_paths.yaml`` names: (kind, folder, is_default) in file order.

    The format is ComfyUI's: top-level sections (one per installation), each with an optional
    ``base_path`` (``~`` and ``$VARS`` expanded; relative to the file's folder), an optional
    ``is_default`` (its folders are searched first), and ``kind: folder`` entries, where the value may
    hold several folders, one per line (a YAML list is taken too). A relative folder is relative to
    ``base_path``, or to the file's folder when the section has none. Raises :class:`FolderSetupError`
    saying what is wrong with the file.
    """
    file = _absolute(file)
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FolderSetupError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FolderSetupError(f"{file}: is not a YAML file ({cut(str(exc), 200)})") from None
    if document is None:
        return []
    if not isinstance(document, dict):
        raise FolderSetupError(f"{file}: expected sections (name: {{base_path: ..., loras: ...}}), as ComfyUI's "
                         "extra_model_paths.yaml.example shows")
    entries: list[tuple[str, Path, bool]] = []
    for section, body in document.items():
        entries += _section_folders(file, str(section), body)
    return entries


def _section_folders(file: Path, section: str, body: object) -> list[tuple[str, Path, bool]]:
    """The (kind, folder, is_default) entries of one section of an extra_model_paths.yaml."""
    if body is None:
        return []
    if not isinstance(body, dict):
        raise FolderSetupError(f"{file}: section {section!r} must map kinds to folders (loras: models/Lora)")
    body = dict(body)
    anchor = file.parent
    base_path = body.pop("base_path", None)
    if base_path is not None:
        anchor = anchor / os.path.expandvars(os.path.expanduser(str(base_path)))
    is_default = bool(body.pop("is_default", False))
    entries = []
    for kind, value in body.items():
        for line in _folder_lines(file, section, str(kind), value):
            folder = Path(os.path.expandvars(os.path.expanduser(line)))
            entries.append((str(kind), Path(os.path.normpath(anchor / folder)), is_default))
    return entries


def _folder_lines(file: Path, section: str, kind: str, value: object) -> list[str]:
    """The folders one ``kind:`` entry names: text with one folder per line, or a list of them."""
    if isinstance(value, str):
        lines = value.splitlines()
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        lines = value
    else:
        raise FolderSetupError(f"{file}: {section}.{kind} must be a folder, or several, one per line")
    return [line.strip() for line in lines if line.strip()]


def configured(models_dirs: Sequence[str | Path] = (), extra_model_paths: Sequence[str | Path] = (),
               input_dir: str | Path | None = None, *, environ: Mapping[str, str] | None = None,
               cwd: str | Path | None = None) -> ModelFolders:
    """The folders a command searches, from its options.

    Models folders: ``models_dirs`` (``--models-dir``), else those in the environment variable
    :data:`MODELS_DIR_VARIABLE`, else ``./models`` when it exists; then the folders of each
    ``extra_model_paths.yaml`` (``--extra-model-paths``), appended, or put first where a section says
    ``is_default``. Input images: ``input_dir`` (``--input-dir``), else ``./input`` when it exists.
    Raises :class:`FolderSetupError` for a folder given that does not exist, and for an unreadable yaml file.
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    builder = _Builder()
    for root in _models_dirs(models_dirs, environ, cwd):
        builder.add_models_dir(root)
    for file in extra_model_paths:
        for kind, folder, first in read_extra_model_paths(cwd / Path(file).expanduser()):
            builder.add(kind, folder, first)
    if input_dir is not None:
        builder.add(INPUT, _existing_folder(cwd / Path(input_dir).expanduser(), "--input-dir"))
    elif (cwd / DEFAULT_INPUT_DIR).is_dir():
        builder.add(INPUT, _absolute(cwd / DEFAULT_INPUT_DIR))
    return builder.build()


def _models_dirs(given: Sequence[str | Path], environ: Mapping[str, str], cwd: Path) -> list[Path]:
    """The models folders in force: given, else from the environment, else ./models when there is one."""
    if given:
        return [_existing_folder(cwd / Path(folder).expanduser(), "--models-dir") for folder in given]
    from_environment = [part for part in environ.get(MODELS_DIR_VARIABLE, "").split(os.pathsep) if part]
    if from_environment:
        return [_existing_folder(cwd / Path(folder).expanduser(), MODELS_DIR_VARIABLE) for folder in from_environment]
    default = cwd / DEFAULT_MODELS_DIR
    return [_absolute(default)] if default.is_dir() else []


def _existing_folder(folder: Path, source: str) -> Path:
    if not folder.is_dir():
        raise FolderSetupError(f"{source} {folder}: no such folder")
    return _absolute(folder)


def _absolute(path: str | Path) -> Path:
    """``path`` made absolute without resolving symlinks (a linked models folder keeps the name it was given)."""
    return Path(os.path.abspath(Path(path).expanduser()))


NO_FOLDERS = ModelFolders()
_active: ContextVar[ModelFolders | None] = ContextVar("model_folders", default=None)


def active_folders() -> ModelFolders:
    """The folders in force here: those of the innermost :func:`using_folders` block (none outside one)."""
    return _active.get() or NO_FOLDERS


@contextmanager
def using_folders(folders: ModelFolders) -> Iterator[ModelFolders]:
    """Within this block names are looked up in ``folders`` (the command line wraps each command in one)."""
    token = _active.set(folders)
    try:
        yield folders
    finally:
        _active.reset(token)


def name_parts(name: str, kind: str = "") -> tuple[str, ...] | None:
    """The folder and file names of a name as ComfyUI writes it (``style/foo.safetensors``, or with
    Windows' backslashes), or None for what is no name in a folder: empty, absolute, ``~``, or
    climbing out with ``..`` (a shared workflow must not reach outside the models folders)."""
    if canonical_kind(kind) == INPUT:
        name = name.removesuffix(ANNOTATION)
    if not name or "\0" in name or name.startswith(("/", "\\", "~")) or (len(name) > 1 and name[1] == ":"):
        return None
    parts = tuple(part for part in name.replace("\\", "/").split("/") if part not in ("", "."))
    return parts if parts and ".." not in parts else None


def find_model(name: str, kind: str) -> Path | None:
    """The file (a folder for the ``diffusers`` kind) called ``name`` in the active folders of ``kind``,
    subfolders included; the first folder that has it wins. None when no folder has it, or when
    ``name`` is no name in a folder (see :func:`name_parts`)."""
    parts = name_parts(name, kind) if isinstance(name, str) else None
    if parts is None:
        return None
    for folder_kind, folder in active_folders().searched(kind):
        candidate = folder.joinpath(*parts)
        if _usable(candidate, folder_kind):
            return candidate
    return None


def find_any(name: str, kinds: Sequence[str] = tuple(LAYOUT)) -> Path | None:
    """The file called ``name`` in the first of ``kinds`` (every model kind, by default) whose folders
    have it: for commands that take any model file (``inspect``)."""
    return next((found for kind in kinds if (found := find_model(name, kind)) is not None), None)


def _usable(path: Path, kind: str) -> bool:
    """Whether ``path`` is an entry of ``kind``: a file (symlinks followed), or a folder for a folder kind."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and kind in FOLDER_KINDS)


def portable_name(path: str | Path, kind: str) -> str | None:
    """The name of ``path`` (absolute) under a folder of ``kind``, as a workflow should carry it
    (``style/foo.safetensors``, forward slashes), or None when it lies in none of them, or when
    that name would find another file (an earlier folder holding one of the same name)."""
    path = Path(path)
    if not path.is_absolute():
        return None
    for folder_kind, folder in active_folders().searched(kind):
        relative = _relative_to(path, folder)
        if relative is None:
            continue
        name = PurePosixPath(*relative.parts).as_posix()
        found = find_model(name, kind)
        if found is not None and _same_entry(found, path) and _usable(path, folder_kind):
            return name
    return None


def _relative_to(path: Path, folder: Path) -> Path | None:
    """``path`` relative to ``folder``, comparing both as given and with symlinks resolved."""
    for inside in (path, _resolved(path)):
        for root in (folder, _resolved(folder)):
            if inside != root and inside.is_relative_to(root):
                return inside.relative_to(root)
    return None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _same_entry(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def names_in(kind: str) -> list[str]:
    """Every name of ``kind`` in the active folders (model files by their extension, images for
    ``input``, pipeline folders for ``diffusers``), sorted; each folder listed up to a bound."""
    names: set[str] = set()
    for folder_kind, folder in active_folders().searched(kind):
        names.update(_listed(folder, folder_kind))
    return sorted(names)


def _listed(folder: Path, kind: str) -> Iterator[str]:
    """The names of ``kind`` under ``folder`` (symlinked subfolders are not entered, ``.git`` is skipped)."""
    suffixes = IMAGE_SUFFIXES if kind == INPUT else MODEL_SUFFIXES
    for count, (relative, mode) in enumerate(scan_tree(folder)):
        if count >= LISTING_LIMIT:
            return
        parts = PurePosixPath(*Path(relative).parts)
        if mode is None or ".git" in parts.parts:
            continue
        if kind in FOLDER_KINDS:
            if parts.name == DIFFUSERS_MARKER and len(parts.parts) > 1:
                yield parts.parent.as_posix()
        elif stat.S_ISREG(mode) and parts.suffix.lower() in suffixes:
            yield parts.as_posix()


def near_names(name: str, kind: str, limit: int = NEAR_NAMES) -> list[str]:
    """Names of ``kind`` in the active folders that look like ``name``: the same file name in
    another subfolder first, then names alike by text (case ignored). At most ``limit``."""
    parts = name_parts(name, kind) or name_parts(Path(name).name, kind)
    if parts is None:
        return []
    wanted = cut("/".join(parts), 200).lower()  # difflib is quadratic in the length
    candidates = names_in(kind)
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    same_file = [c for c in candidates if PurePosixPath(c).name.lower() == PurePosixPath(wanted).name]
    alike = difflib.get_close_matches(wanted, list(by_lower), n=limit, cutoff=0.6)
    return list(dict.fromkeys([*same_file, *(by_lower[c] for c in alike)]))[:limit]


def not_found_hint(name: str, kind: str) -> str:
    """What a "file not found" problem adds for an input of ``kind``: the folders searched by name and
    the near names there, or how to name a models folder when none is set."""
    kind = canonical_kind(kind)
    searched = [folder for _, folder in active_folders().searched(kind)]
    if not searched:
        return "; " + _how_to_set(kind)
    existing = [str(folder) for folder in searched if folder.is_dir()]
    shown = ", ".join(cut(folder, 200) for folder in existing[:6]) or "none of which exists"
    near = near_names(name, kind)
    where = f"; not found by name in the {kind} folders either ({shown})"
    return where + (f"; near names there: {', '.join(near)}" if near else "")


def _how_to_set(kind: str) -> str:
    """How to give the folders of ``kind``, when none is set."""
    if kind == INPUT:
        return "no input folder is set, to find images by name: give --input-dir DIR (default: ./input)"
    setting = "no models folder is set" if not active_folders() else f"no {kind} folder is set"
    return (f"{setting}, to find files by name: give --models-dir DIR (a folder laid out as ComfyUI's models/, "
            f"with {kind}/ in it; default: ./models), --extra-model-paths FILE (ComfyUI's "
            f"extra_model_paths.yaml), or set {MODELS_DIR_VARIABLE}")
