"""MLflow model registry I/O: pull a bundle by URI, register a sanitized bundle, move aliases.

This is the only module of tbar-guard that imports mlflow (lazily, inside the functions, so the
rest of the CLI starts without paying for the import). A model is always a *bundle* directory
(``open_clip_config.json``, ``open_clip_model.safetensors``, ``zeroshot.json``): it is stored in
MLflow as plain run artifacts and registered as a model version whose source is
``runs:/<run_id>/model``. No MLmodel file and no pickle is ever written or read.

Model URIs accepted by :func:`pull`::

    ./path/to/bundle  file:///abs/bundle   a local bundle directory (not copied)
    models:/<name>/<version>               a registered version
    models:/<name>/latest                  the highest READY version
    models:/<name>@<alias>                 the version an alias points to
    runs:/<run_id>/<artifact_path>         artifacts of a run

The tracking server is the ``tracking_uri`` argument, else MLflow's own resolution
(``MLFLOW_TRACKING_URI``, then MLflow's default). The model registry is always the same server.
Credentials come only from MLflow's environment (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, or userinfo in the URI); every error
message is scrubbed of them (:func:`redact_uri`).

Every failure is a :class:`~tbar_guard.errors.RegistryError` naming the URI and the (redacted)
tracking server, with a hint.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tbar_guard.bundle import BUNDLE_FILES, WEIGHTS_FILE, sha256_file
from tbar_guard.errors import RegistryError, TbarGuardError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


MODEL_ARTIFACT_PATH = "model"  # where the bundle lives inside a run's artifacts
REPORT_ARTIFACT_PATH = "report"  # where register_sanitized puts report.json / report.md / PNGs

SOURCE_KEY_TAG = "tbar_guard.source_key"
POLICY_SHA256_TAG = "tbar_guard.policy_sha256"
WEIGHTS_SHA256_TAG = "tbar_guard.weights_sha256"  # set on every version we register; checked on pull

DEFAULT_EXPERIMENT = "tbar-guard"

# MLflow's own knobs, set for this process unless the user already set them (names and types
# from mlflow/environment_variables.py, read by MLflow at each request):
#   * bounded retries: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) take minutes
#     to give up on a dead server; with these a refused connection fails in ~7 s
#     (urllib3 sleeps 0, 2, 4 s + jitter between the 4 attempts). The timeout is per socket
#     operation (connect or read), so a black-holed host costs up to 4 x 30 s.
#   * no tqdm progress bars on artifact up/downloads, no "View run ... at: <url>" lines on stdout
#     when a run ends (MlflowClient.set_terminated -> _log_url), no model URL prints.
MLFLOW_ENV_DEFAULTS: Mapping[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # an int in MLflow
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_PRINT_MODEL_URLS_ON_CREATION": "false",
}

_SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN")
_SECRET_QUERY_PARAM = re.compile(
    r"(?<![^&])(?P<key>[^&=#]*(?:pass|pwd|secret|token|key|sig|auth|credential)[^&=#]*)=[^&#]*",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"]+)@")
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):")
_RUN_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_ALIAS = re.compile(r"^[\w\-]+$")
_MAX_DETAIL = 600


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class ModelRef:
    """A parsed model URI. ``version`` is a decimal version number or the literal ``"latest"``."""

    uri: str
    kind: Literal["local", "models", "runs"]
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class PulledModel:
    """A bundle on local disk, and what it was resolved from."""

    ref: ModelRef
    local_dir: Path
    name: str | None
    version: str | None
    run_id: str | None
    sha256: str


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    uri: str


# --------------------------------------------------------------------------------------------
# environment, redaction, errors


def configure_mlflow_env() -> None:
    """Set :data:`MLFLOW_ENV_DEFAULTS` in ``os.environ`` where the user has not set them."""
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # MLflow logs schema migrations of a new sqlite store at INFO ("Creating initial MLflow database
    # tables..."); keep the CLI's stderr to what tbar-guard itself says.
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def redact_uri(uri: str) -> str:
    """``uri`` without credentials: userinfo (``user:pass@``) is removed and the values of
    secret-looking query parameters (``token=``, ``password=``...) are replaced by ``***``.
    Everything else is kept as written."""
    uri = _URL_USERINFO.sub(r"\g<scheme>", uri)
    base, sep, query = uri.partition("?")
    if sep:
        query = _SECRET_QUERY_PARAM.sub(r"\g<key>=***", query)
    return base + sep + query


def _scrub(text: str, tracking_uri: str | None) -> str:
    """Remove credentials from a message: URL userinfo anywhere, the tracking URI's password,
    and the values of MLflow's credential environment variables."""
    text = _URL_USERINFO.sub(r"\g<scheme>", text)
    secrets: list[str] = [v for k in _SECRET_ENV if (v := os.environ.get(k, "")) and len(v) >= 4]
    if tracking_uri:
        try:
            parts = urllib.parse.urlsplit(tracking_uri)
            if parts.password:
                secrets += [parts.password, urllib.parse.unquote(parts.password)]
        except ValueError:
            pass
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def redact_text(text: str, tracking_uri: str | None = None) -> str:
    """``text`` without URL userinfo, the password of ``tracking_uri`` (or of
    ``MLFLOW_TRACKING_URI``) and the values of MLflow's credential variables. Used by the CLI on
    everything it prints about an error, tracebacks included."""
    return _scrub(text, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def _error_code(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    return code if isinstance(code, str) else ""


def _is_connection_problem(exc: BaseException) -> bool:
    import requests

    if isinstance(exc, requests.RequestException | ConnectionError | TimeoutError):
        return True
    text = str(exc)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out", "NewConnectionError"))


def _registry_error(
    action: str, tracking_uri: str, exc: BaseException, not_found_hint: str | None = None
) -> RegistryError:
    server = redact_uri(tracking_uri)
    detail = _scrub(str(exc), tracking_uri).strip() or type(exc).__name__
    detail = detail if len(detail) <= _MAX_DETAIL else detail[:_MAX_DETAIL] + " ..."
    code = _error_code(exc)
    if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") and not_found_hint:
        hint = not_found_hint
    elif code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED") or re.search(
        r"\b(401|403)\b", detail
    ):
        hint = (
            "the server refused the credentials: set MLFLOW_TRACKING_TOKEN or "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
        )
    elif _is_connection_problem(exc):
        hint = (
            f"is the MLflow server at {server} running and reachable? Point MLFLOW_TRACKING_URI "
            "(or the tracking-URI option) at it; retries/timeout: MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
            "MLFLOW_HTTP_REQUEST_TIMEOUT"
        )
    else:
        hint = f"check the MLflow server logs at {server}"
    return RegistryError(f"{action} failed on MLflow server {server}: {detail}", hint=hint)


@contextmanager
def _mlflow_errors(action: str, tracking_uri: str, not_found_hint: str | None = None) -> Iterator[None]:
    """Turn anything MLflow, requests or the file system raises into a RegistryError."""
    try:
        yield
    except TbarGuardError:
        raise
    except Exception as exc:
        err = _registry_error(action, tracking_uri, exc, not_found_hint)
        if _scrub(str(exc), tracking_uri) == str(exc):
            raise err from exc
        raise err from None  # the original message carries a credential: do not chain it


def _resolve_tracking_uri(tracking_uri: str | None) -> str:
    configure_mlflow_env()
    if tracking_uri:
        return tracking_uri
    import mlflow

    return str(mlflow.get_tracking_uri())


def _client(tracking_uri: str) -> MlflowClient:
    """A client whose model registry is the tracking server itself."""
    from mlflow import MlflowClient

    with _mlflow_errors("opening the MLflow tracking store", tracking_uri):
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# --------------------------------------------------------------------------------------------
# validation and URI parsing


def validate_model_name(name: str, uri: str | None = None) -> str:
    """A registered model name: non-empty, no surrounding blanks, no ``/`` or ``:``."""
    where = f" in {uri!r}" if uri is not None else ""
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"empty registered model name{where}", hint="give the model a name")
    if name != name.strip() or "/" in name or ":" in name or "@" in name:
        raise RegistryError(
            f"invalid registered model name {name!r}{where}",
            hint="a name cannot contain '/', ':' or '@', nor start or end with blanks",
        )
    return name


def validate_alias(alias: str, uri: str | None = None) -> str:
    where = f" in {uri!r}" if uri is not None else ""
    if not alias or not _ALIAS.match(alias) or len(alias) > 255:
        raise RegistryError(f"invalid alias {alias!r}{where}", hint="an alias is letters, digits, '_' and '-'")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(
            f"reserved alias {alias!r}{where}",
            hint="'latest' and 'v<N>' are reserved by MLflow; use models:/<name>/latest for the newest",
        )
    return alias


def _validate_version(version: str) -> str:
    if not version.isdigit() or int(version) < 1:
        raise RegistryError(f"invalid model version {version!r}", hint="a version is a number >= 1")
    return str(int(version))


def parse_model_uri(uri: str) -> ModelRef:
    """Parse a model URI (see the module docstring). Raises RegistryError naming the bad URI."""
    usage = (
        "use a local bundle directory, models:/<name>/<version>, models:/<name>/latest, "
        "models:/<name>@<alias> or runs:/<run_id>/<artifact_path>"
    )
    if not isinstance(uri, str) or not uri.strip():
        raise RegistryError(f"empty model URI {uri!r}", hint=usage)
    m = _SCHEME.match(uri)
    scheme = m.group("scheme").lower() if m else ""
    if not m or len(scheme) == 1:  # no scheme, or a Windows drive letter
        return ModelRef(uri=uri, kind="local", path=uri)
    if scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise RegistryError(f"remote file URI {uri!r} is not supported", hint=usage)
        return ModelRef(uri=uri, kind="local", path=urllib.parse.unquote(parts.path))

    rest = uri[m.end() :]
    if scheme not in ("models", "runs"):
        raise RegistryError(f"unsupported model URI scheme {scheme + ':'!r} in {uri!r}", hint=usage)
    if not rest.startswith("/") or rest.startswith("//"):
        raise RegistryError(
            f"malformed model URI {uri!r}",
            hint=f"{usage} (one slash after the colon; the server comes from MLFLOW_TRACKING_URI)",
        )
    rest = rest[1:]

    if scheme == "runs":
        run_id, _, path = rest.partition("/")
        path = path.strip("/")
        if not run_id or not _RUN_ID.match(run_id) or not path:
            raise RegistryError(f"malformed runs URI {uri!r}", hint="use runs:/<run_id>/<artifact_path>")
        if any(part in ("", ".", "..") for part in path.split("/")):
            raise RegistryError(f"invalid artifact path in {uri!r}", hint="no '.', '..' or '//' in the path")
        return ModelRef(uri=uri, kind="runs", run_id=run_id, path=path)

    models_hint = "use models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>"
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if not name or not alias or "/" in alias:
            raise RegistryError(f"malformed model URI {uri!r}", hint=models_hint)
        try:
            validate_model_name(name, uri)
            validate_alias(alias, uri)
        except RegistryError as e:
            raise RegistryError(f"malformed model URI {uri!r}: {e.message}", hint=e.hint) from None
        return ModelRef(uri=uri, kind="models", name=name, alias=alias)
    parts_ = rest.split("/")
    if len(parts_) != 2 or not parts_[0] or not parts_[1]:
        raise RegistryError(f"malformed model URI {uri!r}", hint=models_hint)
    name, version = parts_
    try:
        validate_model_name(name, uri)
    except RegistryError as e:
        raise RegistryError(f"malformed model URI {uri!r}: {e.message}", hint=e.hint) from None
    if version.lower() == "latest":
        return ModelRef(uri=uri, kind="models", name=name, version="latest")
    if not version.isdigit() or int(version) < 1:
        raise RegistryError(
            f"malformed model URI {uri!r}: version {version!r} is not a number",
            hint=f"{models_hint} (stages such as 'Production' are not supported: use an alias)",
        )
    return ModelRef(uri=uri, kind="models", name=name, version=str(int(version)))


# --------------------------------------------------------------------------------------------
# bundles


def is_bundle(path: Path) -> bool:
    """True when ``path`` is a directory holding the three bundle files."""
    return path.is_dir() and all((path / f).is_file() for f in BUNDLE_FILES)


def find_bundle_dir(path: Path) -> Path | None:
    """``path`` if it is a bundle, else its only subdirectory if that is one, else None.

    (MLflow nests a downloaded artifact directory under its own name.)"""
    if is_bundle(path):
        return path
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and is_bundle(entries[0]):
            return entries[0]
    return None


def _require_bundle(path: Path, uri: str) -> Path:
    found = find_bundle_dir(path)
    if found is not None:
        return found
    if not path.exists():
        raise RegistryError(f"model {uri!r}: {path} does not exist", hint="check the path or URI")
    present = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
    missing = [f for f in BUNDLE_FILES if not (path / f).is_file()]
    raise RegistryError(
        f"model {uri!r} is not a tbar-guard bundle: missing {', '.join(missing)} (found: "
        f"{', '.join(present) or 'nothing'})",
        hint=f"a bundle is a directory with {', '.join(BUNDLE_FILES)}; "
        "create one with tbar-guard's import/sanitize commands",
    )


# --------------------------------------------------------------------------------------------
# pull


def _model_filter(name: str) -> str:
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    raise RegistryError(f"model name {name!r} has both quote characters", hint="rename the model")


def _iter_versions(client: MlflowClient, name: str) -> Iterator[ModelVersion]:
    token: str | None = None
    while True:
        page = client.search_model_versions(_model_filter(name), max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _resolve_version(client: MlflowClient, ref: ModelRef) -> ModelVersion:
    assert ref.name is not None
    name = ref.name
    client.get_registered_model(name)  # a clear "model not found" before anything else
    if ref.alias is not None:
        return client.get_model_version_by_alias(name, ref.alias)
    if ref.version == "latest":
        ready = [v for v in _iter_versions(client, name) if v.status == "READY"]
        if not ready:
            raise RegistryError(
                f"model {ref.uri!r}: registered model {name!r} has no READY version",
                hint="register a version first, or pull a specific one",
            )
        return max(ready, key=lambda v: int(v.version))
    assert ref.version is not None
    return client.get_model_version(name, ref.version)


def pull(uri: str, dest: Path, tracking_uri: str | None = None) -> PulledModel:
    """Get the bundle ``uri`` names onto local disk.

    A local path is verified in place (``local_dir`` is the path, or its single bundle
    subdirectory). A ``models:/`` or ``runs:/`` URI is downloaded into a new directory under
    ``dest`` (which the caller owns and cleans up), then verified. Versions registered by
    :func:`push_bundle`/:func:`register_sanitized` carry the weights' sha256 as a tag, and a
    download that does not match it is refused.
    """
    ref = parse_model_uri(uri)
    if ref.kind == "local":
        assert ref.path is not None
        local = _require_bundle(Path(ref.path).expanduser(), uri)
        return PulledModel(ref, local, None, None, None, sha256_file(local / WEIGHTS_FILE))

    tracking = _resolve_tracking_uri(tracking_uri)
    client = _client(tracking)
    import mlflow.artifacts

    name: str | None = None
    version: str | None = None
    expected_sha: str | None = None
    if ref.kind == "models":
        not_found = (
            f"check the name, version and alias of {uri!r} on the server "
            "(aliases are set with move_alias / the MLflow UI)"
        )
        with _mlflow_errors(f"resolving {uri!r}", tracking, not_found):
            try:
                mv = _resolve_version(client, ref)
            except Exception as exc:
                if ref.alias is not None and _error_code(exc) == "INVALID_PARAMETER_VALUE":
                    raise RegistryError(
                        f"model {uri!r}: alias {ref.alias!r} is not set on {ref.name!r} "
                        f"(MLflow server {redact_uri(tracking)})",
                        hint=f"set it first (move_alias), or pull models:/{ref.name}/<version>",
                    ) from None
                raise
            if mv.status != "READY":
                raise RegistryError(
                    f"model {uri!r}: version {mv.version} is {mv.status}, not READY",
                    hint="wait for the registration to finish, or pull another version",
                )
            name, version, run_id = mv.name, str(mv.version), mv.run_id
            expected_sha = (mv.tags or {}).get(WEIGHTS_SHA256_TAG)
            download_uri = client.get_model_version_download_uri(mv.name, mv.version)
    else:
        assert ref.run_id is not None and ref.path is not None
        run_id = ref.run_id
        download_uri = f"runs:/{ref.run_id}/{ref.path}"
        with _mlflow_errors(f"resolving {uri!r}", tracking, f"no run {ref.run_id!r} on the server"):
            client.get_run(ref.run_id)

    missing = (
        f"run {ref.run_id} has no artifact {ref.path!r}: check the path in the run's artifacts"
        if ref.kind == "runs"
        else f"the version's artifacts ({download_uri}) are gone from the artifact store"
    )
    with _mlflow_errors(f"downloading {uri!r}", tracking, missing):
        dest.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="pull-", dir=dest))
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri, dst_path=str(target), tracking_uri=tracking, registry_uri=tracking
            )
        )
    bundle = _require_bundle(local, uri)
    digest = sha256_file(bundle / WEIGHTS_FILE)
    if expected_sha is not None and expected_sha != digest:
        raise RegistryError(
            f"model {uri!r}: downloaded weights have sha256 {digest}, but the version was "
            f"registered with {expected_sha}",
            hint="the artifact was changed after registration; do not use it",
        )
    return PulledModel(ref, bundle, name, version, run_id or None, digest)


# --------------------------------------------------------------------------------------------
# register


def _experiment_id(client: MlflowClient, experiment: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            return str(client.create_experiment(experiment, artifact_location=artifact_location))
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(experiment)  # created concurrently
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise RegistryError(
            f"MLflow experiment {experiment!r} is deleted",
            hint="restore it (mlflow experiments restore) or use another experiment name",
        )
    return str(exp.experiment_id)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # created concurrently: fine
            raise


def _verify_version(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Wait (briefly) for the version to be READY and check every tag landed."""
    deadline = time.monotonic() + 60.0
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            break
        if mv.status != "PENDING_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(
                f"model version {name}/{version} ended {mv.status}",
                hint=str(getattr(mv, "status_message", "") or "see the MLflow server logs"),
            )
        time.sleep(1.0)
    have = mv.tags or {}
    wrong = sorted(k for k, v in tags.items() if have.get(k) != v)
    if wrong:
        raise RegistryError(
            f"model version {name}/{version} is missing tags {', '.join(wrong)}",
            hint="the server did not store the version tags; check its logs",
        )


def _run_versions(client: MlflowClient, name: str, run_id: str) -> list[str]:
    """Versions of ``name`` whose run is ``run_id`` (any status)."""
    from mlflow.exceptions import MlflowException

    try:
        return [str(v.version) for v in _iter_versions(client, name) if v.run_id == run_id]
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


def _register(
    bundle_dir: Path,
    artifacts_dir: Path | None,
    name: str,
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    params: Mapping[str, str],
    tracking_uri: str | None,
    experiment: str,
    artifact_location: str | None,
) -> RegisteredVersion:
    """One run holding metrics, params, report artifacts and the bundle; one model version on it.

    MLflow call choice: ``MlflowClient.create_model_version(name, source="runs:/<run>/model",
    run_id=...)``. It registers plain run artifacts (no MLmodel file needed, nothing pickled) and
    keeps the bundle and the report in the same run, which the version links to. The MLflow 3
    LoggedModel route (initialize_logged_model -> log_model_artifacts -> finalize_logged_model
    -> register_model("models:/<model_id>")) also works but stores the bundle apart from the
    run's report artifacts and takes three more round trips; ``mlflow.register_model`` on a
    runs:/ URI of plain files fails in MLflow 3 ("Unable to find a logged_model").

    Fail closed: once the version exists, any later failure deletes it again (best effort; if
    even that fails, the error says which version to delete), and the run is marked FAILED.
    """
    validate_model_name(name)
    if not experiment or not experiment.strip():
        raise RegistryError("empty MLflow experiment name", hint="give an experiment name")
    bundle = _require_bundle(bundle_dir, str(bundle_dir))
    if artifacts_dir is not None and not artifacts_dir.is_dir():
        raise RegistryError(f"report directory {str(artifacts_dir)!r} does not exist", hint="")
    for key, value in {**tags, **params}.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise RegistryError(f"tag/param {key!r}={value!r} is not a non-empty str key with a str value")
    for key, val in metrics.items():
        if not isinstance(val, int | float) or isinstance(val, bool) or not math.isfinite(val):
            raise RegistryError(f"metric {key!r}={val!r} is not a finite number", hint="")
    digest = sha256_file(bundle / WEIGHTS_FILE)
    if tags.get(WEIGHTS_SHA256_TAG, digest) != digest:
        raise RegistryError(f"tag {WEIGHTS_SHA256_TAG} does not match the bundle's weights")
    version_tags = {**tags, WEIGHTS_SHA256_TAG: digest}

    tracking = _resolve_tracking_uri(tracking_uri)
    client = _client(tracking)
    from mlflow.entities import Metric, Param

    action = f"registering {str(bundle_dir)!r} as {name!r}"
    with _mlflow_errors(action, tracking):
        exp_id = _experiment_id(client, experiment, artifact_location)
        run = client.create_run(exp_id, tags=dict(version_tags), run_name=f"tbar-guard-{name}")
    run_id = str(run.info.run_id)
    version: str | None = None
    try:
        with _mlflow_errors(action, tracking):
            now = int(time.time() * 1000)
            metric_list = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
            param_list = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(metric_list), 1000):  # MLflow's per-request limits
                client.log_batch(run_id, metrics=metric_list[i : i + 1000])
            for i in range(0, len(param_list), 100):
                client.log_batch(run_id, params=param_list[i : i + 100])
            if artifacts_dir is not None:
                client.log_artifacts(run_id, str(artifacts_dir), REPORT_ARTIFACT_PATH)
            for fname in BUNDLE_FILES:  # only the bundle's own files: nothing else is published
                client.log_artifact(run_id, str(bundle / fname), MODEL_ARTIFACT_PATH)
            _ensure_registered_model(client, name)
            mv = client.create_model_version(
                name,
                source=f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}",
                run_id=run_id,
                tags=version_tags,
                await_creation_for=0,  # we poll in _verify_version (MLflow's wait logs at INFO)
            )
            version = str(mv.version)
            # MLflow's HTTP client retries POSTs too: when a create_model_version request reached
            # the server but its answer was lost (a 5xx from a proxy, a timeout), the retry makes a
            # second version of the same run. Keep only the one we were answered with.
            for extra in _run_versions(client, name, run_id):
                if extra != version:
                    client.delete_model_version(name, extra)
            _verify_version(client, name, version, version_tags)
            client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        leftover = ""
        try:  # every version of this run, also one whose creation answer never arrived
            doomed = sorted(set(_run_versions(client, name, run_id)) | ({version} if version else set()), key=int)
        except Exception:
            doomed = [version] if version is not None else []
        undeleted = []
        for v in doomed:
            try:
                client.delete_model_version(name, v)
            except Exception:
                undeleted.append(v)
        if undeleted:
            leftover = f"; version(s) {', '.join(undeleted)} of {name!r} could not be deleted: delete them by hand"
        if version is None and doomed and not undeleted:
            version = doomed[0]
        with suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        if not isinstance(exc, Exception):
            raise
        err = exc if isinstance(exc, RegistryError) else _registry_error(action, tracking, exc)
        if leftover or version is not None:
            undone = leftover or f"; version {version} was created and deleted again"
            raise RegistryError(err.message + undone, hint=err.hint) from None
        if err is exc:
            raise
        raise err from None
    return RegisteredVersion(name=name, version=version, run_id=run_id, uri=f"models:/{name}/{version}")


def push_bundle(
    bundle_dir: Path,
    name: str,
    tracking_uri: str | None = None,
    tags: Mapping[str, str] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
) -> RegisteredVersion:
    """Log the bundle as artifacts of a new run (under ``model/``) and register it as a new
    version of ``name`` (created if needed), with ``tags`` as version tags.

    ``artifact_location`` is used only when ``experiment`` does not exist yet and is created."""
    return _register(bundle_dir, None, name, tags or {}, {}, {}, tracking_uri, experiment, artifact_location)


def register_sanitized(
    bundle_dir: Path,
    artifacts_dir: Path,
    target_name: str,
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    params: Mapping[str, str],
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
) -> RegisteredVersion:
    """Register a sanitized bundle: one run with ``metrics``, ``params``, every file of
    ``artifacts_dir`` under ``report/`` and the bundle under ``model/``; a new version of
    ``target_name`` with ``tags`` (plus the weights' sha256) as version tags. Never leaves a
    half-registered version behind: see :func:`_register`. ``artifact_location``: as in
    :func:`push_bundle`."""
    return _register(
        bundle_dir, artifacts_dir, target_name, tags, metrics, params, tracking_uri, experiment, artifact_location
    )


# --------------------------------------------------------------------------------------------
# lookups, tags, aliases


def sanitized_versions(
    target_name: str,
    source_uri_key: str,
    policy_sha256: str,
    tracking_uri: str | None = None,
    ready_only: bool = True,
) -> list[RegisteredVersion]:
    """Versions of ``target_name`` tagged with this source key and policy hash, oldest first
    (READY ones only, unless ``ready_only`` is false: then every version not FAILED_REGISTRATION).
    Tags are matched in Python: MLflow's tag filters differ between backends."""
    validate_model_name(target_name)
    tracking = _resolve_tracking_uri(tracking_uri)
    client = _client(tracking)
    with _mlflow_errors(f"searching versions of {target_name!r}", tracking):
        matches = [
            v
            for v in _iter_versions(client, target_name)
            if (v.status == "READY" if ready_only else v.status != "FAILED_REGISTRATION")
            and (v.tags or {}).get(SOURCE_KEY_TAG) == source_uri_key
            and (v.tags or {}).get(POLICY_SHA256_TAG) == policy_sha256
        ]
    return [
        RegisteredVersion(
            name=v.name, version=str(v.version), run_id=str(v.run_id or ""), uri=f"models:/{v.name}/{v.version}"
        )
        for v in sorted(matches, key=lambda v: int(v.version))
    ]


def find_sanitized(
    target_name: str, source_uri_key: str, policy_sha256: str, tracking_uri: str | None = None
) -> RegisteredVersion | None:
    """The newest READY version of ``target_name`` tagged with this source key and policy hash
    (for idempotent re-runs), or None."""
    matches = sanitized_versions(target_name, source_uri_key, policy_sha256, tracking_uri)
    return matches[-1] if matches else None


def set_version_tags(name: str, version: str, tags: Mapping[str, str], tracking_uri: str | None = None) -> None:
    validate_model_name(name)
    version = _validate_version(version)
    tracking = _resolve_tracking_uri(tracking_uri)
    client = _client(tracking)
    with _mlflow_errors(
        f"tagging models:/{name}/{version}", tracking, f"no version {version} of {name!r} on the server"
    ):
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)


def delete_version(name: str, version: str, tracking_uri: str | None = None) -> None:
    """Delete one model version (used to roll back a registration whose follow-up steps failed)."""
    validate_model_name(name)
    version = _validate_version(version)
    tracking = _resolve_tracking_uri(tracking_uri)
    client = _client(tracking)
    with _mlflow_errors(f"deleting models:/{name}/{version}", tracking):
        client.delete_model_version(name, version)


def move_alias(name: str, alias: str, version: str, tracking_uri: str | None = None) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` (moving it from wherever it was)."""
    validate_model_name(name)
    validate_alias(alias)
    version = _validate_version(version)
    tracking = _resolve_tracking_uri(tracking_uri)
    client = _client(tracking)
    with _mlflow_errors(
        f"moving alias {name}@{alias} to version {version}",
        tracking,
        f"no version {version} of {name!r} on the server",
    ):
        client.set_registered_model_alias(name, alias, version)


def get_alias_version(name: str, alias: str, tracking_uri: str | None = None) -> str | None:
    """The version ``models:/<name>@<alias>`` points to, or None when no version holds the alias
    (including when the registered model does not exist)."""
    validate_model_name(name)
    validate_alias(alias)
    tracking = _resolve_tracking_uri(tracking_uri)
    client = _client(tracking)
    from mlflow.exceptions import MlflowException

    with _mlflow_errors(f"reading alias {name}@{alias}", tracking):
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            # OSS answers INVALID_PARAMETER_VALUE for an unset alias (the alias was validated
            # above) and RESOURCE_DOES_NOT_EXIST for an unknown model.
            if _error_code(exc) in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise
