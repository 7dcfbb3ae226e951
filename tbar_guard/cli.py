"""The Typer CLI: the only module that prints or exits. Exit codes: tbar_guard.exit_codes."""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tbar_guard import __version__
from tbar_guard.errors import TbarGuardError, UsageError
from tbar_guard.exit_codes import ExitCode

# Click reports bad arguments with exit code 2, which is tbar-guard's "error" code. The CI
# contract says usage problems exit 4, so every click usage error uses that code.
click.exceptions.UsageError.exit_code = int(ExitCode.USAGE)
try:  # typer >= 0.29 vendors its own copy of click and raises that copy's errors
    import typer._click.exceptions as _typer_click_exceptions

    _typer_click_exceptions.UsageError.exit_code = int(ExitCode.USAGE)
except ImportError:  # an older typer uses click itself
    pass

app = typer.Typer(
    name="tbar-guard",
    help="Model-security gate for CLIP models: detect backdoors, remove them with TBAR, register the result.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold credentials
    add_completion=False,
)
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

StageProgress = Callable[[str, int, int], None]


@contextmanager
def _progress() -> Iterator[StageProgress]:
    """A rich progress display with one bar per stage name (stderr, so stdout stays clean)."""
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=False, disable=not err_console.is_terminal) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=max(total, done))

        yield update


def _redact(text: str) -> str:
    """No credential reaches the terminal: URL userinfo and MLflow's secret variables are masked."""
    from tbar_guard.registry import redact_text

    return redact_text(text)


def _fail(exc: TbarGuardError) -> typer.Exit:
    message = _redact(str(exc.message))
    err_console.print("[bold red]error:[/] ", markup=True, highlight=False, end="")
    err_console.print(message, markup=False, highlight=False)
    problems = getattr(exc, "problems", ())
    for problem in problems:
        err_console.print(f"  - {_redact(problem)}", markup=False, highlight=False)
    if exc.hint:
        err_console.print(f"hint: {_redact(exc.hint)}", markup=False, highlight=False)
    return typer.Exit(int(exc.exit_code))


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an interrupt so that every cleanup path (atomic outputs, temporary
    directories, registry rollback) runs exactly as for Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` (Python's default is to die
    without running any ``finally``: temporary files would stay and a registration would not be
    rolled back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _guard(run: Callable[[], ExitCode]) -> None:
    """Run a command body; map errors to exit codes (fail closed: never exit 0 on an exception)."""
    try:
        with _sigterm_as_interrupt():
            code = run()
    except TbarGuardError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (SIGINT)"
        err_console.print(
            f"{what}: temporary files were removed; no model was registered and no alias was moved",
            highlight=False,
        )
        raise typer.Exit(int(ExitCode.ERROR)) from None
    except Exception as exc:  # an unexpected crash is an error verdict, never "clean"
        if os.environ.get("TBAR_GUARD_DEBUG"):  # the traceback, scrubbed like every other message
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        else:
            text = f"internal error: {type(exc).__name__}: {exc} (set TBAR_GUARD_DEBUG=1 for the traceback)"
        err_console.print(_redact(text), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(int(ExitCode.ERROR)) from None
    raise typer.Exit(int(code))


def _print_summary(report: dict[str, Any], out: Path | None) -> None:
    verdict = str(report["verdict"])
    colour = {"clean": "green", "removed": "yellow", "unremoved": "red", "backdoor": "red"}.get(verdict, "white")
    out_console.print(f"verdict: [bold {colour}]{verdict}[/]  {report['reason']}", highlight=False)
    if "before" in report and "after" in report:
        table = Table(title="test split")
        table.add_column("")
        table.add_column("clean accuracy", justify="right")
        table.add_column("attack success rate", justify="right")
        for row in ("before", "after"):
            m = report[row]
            asr = m.get("attack_success_rate")
            table.add_row(row, f"{100 * m['clean_accuracy']:.1f}%", "n/a" if asr is None else f"{100 * asr:.1f}%")
        out_console.print(table)
    if "alpha" in report:
        out_console.print(f"alpha: {report['alpha']:g}", highlight=False)
    back = report.get("reemergence")
    if back:
        audit = back.get("audit")
        out_console.print(
            f"re-emergence: ASR {100 * back['attack_success_rate']:.1f}% after a clean fine-tune of the sanitized model "
            f"({back['images']} images, {back['epochs']} epochs, lr {back['lr']:g}; CA {100 * back['clean_accuracy']:.1f}%)"
            + (f"; true trigger {100 * audit['attack_success_rate']:.1f}%" if audit else ""),
            highlight=False,
        )
    xi = report.get("disentanglement")
    if xi:
        chosen = xi.get("at_chosen_alpha")
        out_console.print(
            f"disentanglement: mean xi {xi['mean_xi']:.3f}"
            + (f", at most {chosen['max_xi']:.3f} at the chosen alpha" if chosen else "")
            + " (0 = the trigger vector acts on triggered inputs only; 2 = fully entangled)",
            highlight=False,
        )
    if out is not None:
        out_console.print(f"report: {out / 'report.md'}", highlight=False)
        if report.get("output"):
            out_console.print(f"sanitized model: {report['output']['path']}", highlight=False)


@app.command()
def sanitize(
    model: Annotated[Path, typer.Option(help="Model bundle directory (or a weights file with --arch).")],
    data: Annotated[Path, typer.Option(help="Clean images: a folder of class sub-folders, or .npz with x, y.")],
    trigger: Annotated[str, typer.Option(help="Trigger spec: 'badnet:size=3', inline JSON, or a YAML file.")],
    target: Annotated[str, typer.Option(help="Target class of the backdoor (name or index).")],
    out: Annotated[Path, typer.Option(help="Output directory (must not exist).")],
    policy: Annotated[Path | None, typer.Option(help="YAML policy (defaults if omitted).")] = None,
    arch: Annotated[
        str | None, typer.Option(help="open_clip architecture name, when --model is a weights file.")
    ] = None,
    classes: Annotated[
        Path | None, typer.Option(help="JSON zero-shot task (classnames, templates) for --arch.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides the policy).")] = None,
) -> None:
    """Remove a known backdoor with TBAR and choose alpha against the policy."""

    def run() -> ExitCode:
        from tbar_guard.attacks import parse_trigger
        from tbar_guard.pipeline import sanitize as run_sanitize
        from tbar_guard.policy import load_policy

        pol = load_policy(policy)
        spec = parse_trigger(trigger)
        with _progress() as progress:
            result = run_sanitize(model, data, pol, spec, target, out, arch, classes, progress, device)
        _print_summary(result.report, result.out)
        return result.exit_code

    _guard(run)


def _data_path(data: Path | None, policy: Any) -> Path | None:
    if data is not None:
        return data
    return Path(policy.data.path) if policy.data.path else None


@app.command()
def scan(
    model: Annotated[Path, typer.Option(help="Model bundle directory (or a weights file with --arch).")],
    data: Annotated[
        Path | None, typer.Option(help="Clean images (folder or .npz); default: the policy's data.path.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Report directory (must not exist).")] = Path("tbar-guard-scan"),
    policy: Annotated[Path | None, typer.Option(help="YAML policy (defaults if omitted).")] = None,
    arch: Annotated[
        str | None, typer.Option(help="open_clip architecture name, when --model is a weights file.")
    ] = None,
    classes: Annotated[
        Path | None, typer.Option(help="JSON zero-shot task (classnames, templates) for --arch.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides the policy).")] = None,
) -> None:
    """Look for a backdoor (DECREE trigger inversion). Exit 0 clean, 1 backdoor found."""

    def run() -> ExitCode:
        from tbar_guard.gate import scan as run_scan
        from tbar_guard.policy import load_policy

        pol = load_policy(policy)
        with _progress() as progress:
            result = run_scan(model, _data_path(data, pol), pol, out, device, progress, arch, classes)
        _print_summary(result.report, result.out)
        return result.exit_code

    _guard(run)


@app.command()
def gate(
    model: Annotated[str, typer.Option(help="Bundle path, or models:/name/N, models:/name@alias, runs:/id/path.")],
    policy: Annotated[Path | None, typer.Option(help="YAML policy (defaults if omitted).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Clean images (folder or .npz); default: the policy's data.path.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Report directory (must not exist).")] = Path("tbar-guard-gate"),
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI).", show_default=False)
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides the policy).")] = None,
) -> None:
    """Scan, remove a found backdoor with the inverted trigger, and (registry URIs) register the result."""

    def run() -> ExitCode:
        from tbar_guard.policy import load_policy
        from tbar_guard.promote import gate_uri

        pol = load_policy(policy)
        with _progress() as progress:
            result = gate_uri(model, _data_path(data, pol), pol, out, tracking_uri, device, progress)
        _print_summary(result.report, result.out)
        return result.exit_code

    _guard(run)


@app.command()
def push(
    model: Annotated[Path, typer.Option(help="Model bundle directory to register.")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option(help="Alias to point at the new version (e.g. candidate).")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI).", show_default=False)
    ] = None,
) -> None:
    """Register a bundle in the MLflow Model Registry (safetensors + JSON, no pickle)."""

    def run() -> ExitCode:
        from tbar_guard.promote import push_model

        version = push_model(model, name, alias, tracking_uri)
        out_console.print(f"registered {version.uri}", highlight=False)
        return ExitCode.CLEAN

    _guard(run)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Everything the demo makes goes here.")] = Path("tbar-guard-demo"),
) -> None:
    """Run the whole gate on an embedded example: local MLflow (sqlite), a tiny CLIP, a planted backdoor."""

    def run() -> ExitCode:
        from tbar_guard.demo import run_demo

        with _progress() as progress:
            result = run_demo(workdir, progress, log=lambda msg: err_console.print(msg, highlight=False))
        _print_summary(result.report, result.out)
        report = result.report
        if report.get("registered"):
            out_console.print(f"registered: {report['registered']['uri']}", highlight=False)
        if report.get("alias_moved"):
            out_console.print(f"alias moved: {report['alias_moved']}", highlight=False)
        out_console.print(
            f"browse: mlflow ui --backend-store-uri sqlite:///{(workdir / 'mlflow.db').resolve()}", highlight=False
        )
        # The demo's job is to show the gate working; it succeeds when the gate ran to a verdict.
        return ExitCode.CLEAN

    _guard(run)


@app.command("init-policy")
def init_policy(
    out: Annotated[Path | None, typer.Argument(help="Where to write the policy; stdout if omitted.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write the commented default policy."""

    def run() -> ExitCode:
        from tbar_guard.policy import DEFAULT_POLICY_YAML

        if out is None:
            sys.stdout.write(DEFAULT_POLICY_YAML)
            return ExitCode.CLEAN
        if out.exists() and not force:
            raise UsageError(f"{out} already exists", hint="pass --force to overwrite")
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(DEFAULT_POLICY_YAML, encoding="utf-8")
        os.replace(tmp, out)
        err_console.print(f"wrote {out}", highlight=False)
        return ExitCode.CLEAN

    _guard(run)


@app.command()
def version() -> None:
    """Print the version."""
    out_console.print(__version__, highlight=False)


def main() -> None:
    app()
