"""What a Ray job reads and what is uploaded with it (`rl submit`, rl/jobs.py).

Input paths: every config field typed `InputPath` (core/config.py) is found by walking the loaded config,
so a new loop's path fields come for free. `place_inputs` says what each must become for the job to read
the same file: absolute on a cluster on this machine; on a remote one, absolute as given (shared
storage), relative to the project when inside the upload, or refused (one line naming the key); a path
under an --upload points at the job's copy under _uploads/.

The upload: what Ray packages as the job's working directory (the project less excludes and ignore
files), its size checked here against Ray's limit, and with --upload a staged copy that adds the inputs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from core.config import INPUT_PATH
from core.errors import InputError

UPLOAD_DIR = "_uploads"  # where --upload inputs land in the job's working directory


@dataclass(frozen=True)
class Upload:
    """An input shipped with the job (--upload): `source` here lands at `dest` in its working directory."""

    source: Path
    dest: str


# ---- what the run reads -------------------------------------------------------------------------


def input_paths(cfg: BaseModel, prefix: str = "") -> dict[str, str]:
    """Every `InputPath` field the config sets, by dotted key (a list item by its index:
    data.datasets.0.path). Found through the schema's type markers, so a new loop's fields come for free."""
    found: dict[str, str] = {}
    for name, info in type(cfg).model_fields.items():
        marked = INPUT_PATH in info.metadata or _marked(info.annotation)
        found |= _paths_in(getattr(cfg, name), f"{prefix}{name}", marked)
    return found


def _marked(annotation: Any) -> bool:
    return any(arg is INPUT_PATH or _marked(arg) for arg in get_args(annotation))


def _paths_in(value: Any, key: str, marked: bool) -> dict[str, str]:
    if isinstance(value, BaseModel):
        return input_paths(value, f"{key}.")
    if isinstance(value, list | tuple):
        return {
            k: v for i, item in enumerate(value) for k, v in _paths_in(item, f"{key}.{i}", marked).items()
        }
    if isinstance(value, dict):
        return {
            k: v for name, item in value.items() for k, v in _paths_in(item, f"{key}.{name}", marked).items()
        }
    return {key: value} if marked and isinstance(value, str) else {}


def parse_uploads(paths: list[str]) -> list[Upload]:
    uploads: dict[str, Upload] = {}
    for given in paths:
        source = Path(given).expanduser().resolve()
        if not source.exists():
            raise InputError(f"--upload {given}: no such file or directory")
        dest = f"{UPLOAD_DIR}/{source.name}"
        if dest in uploads and uploads[dest].source != source:
            raise InputError(f"--upload {given}: another upload is also named {source.name}")
        uploads[dest] = Upload(source, dest)
    return list(uploads.values())


def place_inputs(
    cfg: BaseModel, *, local: bool, root: Path, shipped: Collection[str], uploads: list[Upload]
) -> dict[str, str]:
    """{key: path as the job must see it} for every input path that the job would otherwise not find."""
    placed = {}
    for key, value in input_paths(cfg).items():
        given = Path(value).expanduser()
        here = given.resolve()  # relative: against this directory, as `rl COMMAND` here would read it
        upload = next((u for u in uploads if here == u.source or u.source in here.parents), None)
        if upload is not None:
            job_path = Path(upload.dest, here.relative_to(upload.source)).as_posix()
        elif local:
            job_path = str(here)
        elif given.is_absolute():
            continue  # a path on the cluster's nodes (shared storage), as the user means it
        elif _in_upload(here, root, shipped):
            job_path = here.relative_to(root.resolve()).as_posix()
        else:
            raise InputError(
                f"{key}={value} is a relative path outside the upload (the project directory less runs/ and "
                "other excluded folders), which a job on a remote cluster cannot read: give an absolute path "
                "on shared storage its nodes mount, or --upload it if it is small"
            )
        if job_path != value:
            placed[key] = job_path
    return placed


def _in_upload(path: Path, root: Path, shipped: Collection[str]) -> bool:
    try:
        rel = path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return False
    return rel in shipped or any(name.startswith(f"{rel}/") for name in shipped)


def path_overrides(cfg: BaseModel, values: dict[str, str]) -> list[str]:
    """`key=value` overrides setting these dotted keys; a key inside a list sets the whole list (as JSON,
    which the override parser reads as YAML), since an override cannot index into one."""
    plain, lists = {}, {}
    dumped = cfg.model_dump(mode="json")
    for key, value in values.items():
        parts = key.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None:
            plain[key] = value
            continue
        list_key = ".".join(parts[:index])
        node = lists.setdefault(list_key, _get(dumped, parts[:index]))
        for part in parts[index:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    return [f"{k}={v}" for k, v in plain.items()] + [f"{k}={json.dumps(v)}" for k, v in lists.items()]


def _get(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


# ---- the upload -----------------------------------------------------------------------------------


def upload_files(root: Path, excludes: list[str]) -> dict[str, int]:
    """{path relative to root: bytes} of what Ray uploads as the job's working directory (its own walk,
    its excludes and .gitignore/.rayignore handling)."""
    from ray._private.runtime_env import packaging

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    files: dict[str, int] = {}

    def add(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            files[path.relative_to(root).as_posix()] = path.stat().st_size

    quiet = logging.getLogger("rl.jobs.upload")  # Ray logs every ignore file it honours at INFO
    quiet.setLevel(logging.WARNING)
    packaging._dir_travel(root, [packaging._get_excludes(root, excludes)], add, include_gitignore, quiet)
    return files


def check_upload_size(
    root: Path,
    excludes: list[str],
    limit: int | None = None,
    *,
    extra: Sequence[Path] = (),
    files: dict[str, int] | None = None,
) -> int:
    """Bytes of the working-directory upload (uncompressed, --upload inputs included); refuses one over
    Ray's package limit."""
    from ray._private.runtime_env import packaging

    limit = packaging.GCS_STORAGE_MAX_SIZE if limit is None else limit
    sizes: dict[str, int] = {}
    for name, size in (upload_files(root, excludes) if files is None else files).items():
        top = name.split("/")[0]
        sizes[top] = sizes.get(top, 0) + size
    for path in extra:
        sizes[str(path)] = sum(f.stat().st_size for f in [path, *path.rglob("*")] if f.is_file())
    total = sum(sizes.values())
    if total > limit:
        largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        shown = ", ".join(f"{name} {_mib(size)}" for name, size in largest)
        raise InputError(
            f"the project directory {root} would upload {_mib(total)}, over Ray's {_mib(limit)} limit for a "
            f"working_dir (largest: {shown}); leave files out with --exclude PATTERN or a .rayignore file"
        )
    return total


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@contextmanager
def working_dir(runtime_env: dict[str, Any], uploads: tuple[Upload, ...]) -> Iterator[dict[str, Any]]:
    """The runtime_env to submit: the project as is, or (with --upload) a staged copy of what Ray would
    upload from it plus the uploads under _uploads/, removed once Ray has packaged it."""
    if not uploads:
        yield runtime_env
        return
    import shutil
    import tempfile

    root = Path(runtime_env["working_dir"])
    with tempfile.TemporaryDirectory(prefix="rl-job-") as staged:
        for name in upload_files(root, runtime_env["excludes"]):
            if Path(name).name not in (".gitignore", ".rayignore"):  # already applied; must not hit uploads
                (Path(staged) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, Path(staged) / name)
        for upload in uploads:
            dest = Path(staged) / upload.dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if upload.source.is_dir() else shutil.copy2
            copy(upload.source, dest)
        yield {**runtime_env, "working_dir": staged, "excludes": []}
