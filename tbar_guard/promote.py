"""The promotion gate: pull a registry version, gate it, register the sanitized version with its
audit trail, tag the source, move an alias only when the policy passes.

Order of effects (fail closed): the gate runs to a verdict and writes its report locally first;
only then is anything written to the registry. A failure while registering deletes the
half-made version (registry.register_sanitized) and the alias is moved last, so an error or an
interrupt never leaves an alias pointing at an unchecked model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tbar_guard import __version__, registry
from tbar_guard.bundle import ClipBundle, load_bundle, require_new_output
from tbar_guard.exit_codes import ExitCode
from tbar_guard.gate import gate
from tbar_guard.pipeline import RunResult
from tbar_guard.policy import Policy
from tbar_guard.report import REPORT_JSON, REPORT_MD, base_report, to_markdown
from tbar_guard.sanitize import StageProgress

TAG = "tbar_guard."


def push_model(
    model: Path, name: str, alias: str | None, tracking_uri: str | None, artifact_location: str | None = None
) -> registry.RegisteredVersion:
    """Validate a bundle (it must load) and register it; optionally point ``alias`` at it."""
    bundle = load_bundle(model)
    version = registry.push_bundle(
        Path(model),
        name,
        tracking_uri=tracking_uri,
        tags={f"{TAG}weights_sha256": bundle.weights_sha256, f"{TAG}tool_version": __version__},
        artifact_location=artifact_location,
    )
    if alias:
        registry.move_alias(name, alias, version.version, tracking_uri=tracking_uri)
    return version


def _audit_tags(report: dict[str, Any], source: registry.PulledModel, policy: Policy) -> dict[str, str]:
    det = report.get("detection", {})
    tags = {
        f"{TAG}source_uri": source.ref.uri,
        f"{TAG}source_key": f"{source.name}/{source.version}",
        f"{TAG}source_name": str(source.name),
        f"{TAG}source_version": str(source.version),
        f"{TAG}verdict": str(report["verdict"]),
        f"{TAG}policy_sha256": policy.sha256(),
        f"{TAG}tool_version": __version__,
        f"{TAG}input_sha256": source.sha256,
        f"{TAG}pl1": f"{det.get('pl1', float('nan')):.6f}",
        f"{TAG}detection_rule": str(det.get("rule", "")),
    }
    if "alpha" in report:
        tags[f"{TAG}alpha"] = f"{report['alpha']:g}"
    if report.get("removal_method"):
        tags[f"{TAG}removal_method"] = str(report["removal_method"])
    if report.get("target"):
        tags[f"{TAG}target"] = f"{report['target']['index']}:{report['target']['name']}"
    for when in ("before", "after"):
        metrics = report.get(when)
        if metrics:
            tags[f"{TAG}ca_{when}"] = f"{metrics['clean_accuracy']:.4f}"
            asr = metrics.get("attack_success_rate")
            tags[f"{TAG}asr_{when}"] = "n/a" if asr is None else f"{asr:.4f}"
    if report.get("output"):
        tags[f"{TAG}output_sha256"] = str(report["output"]["sha256"])
    return tags


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for when in ("before", "after"):
        m = report.get(when)
        if m:
            out[f"ca_{when}"] = float(m["clean_accuracy"])
            if m.get("attack_success_rate") is not None:
                out[f"asr_{when}"] = float(m["attack_success_rate"])
    det = report.get("detection", {})
    if "pl1" in det:
        out["pl1"] = float(det["pl1"])
        out["proxy_asr"] = float(det["proxy_asr"])
    if "alpha" in report:
        out["alpha"] = float(report["alpha"])
    true = report.get("true_trigger") or {}
    for when in ("before", "after"):
        m = true.get(when)
        if m and m.get("attack_success_rate") is not None:
            out[f"true_trigger_asr_{when}"] = float(m["attack_success_rate"])
    return out


def _rewrite_report(out: Path, report: dict[str, Any]) -> None:
    for name, text in ((REPORT_JSON, json.dumps(report, indent=2) + "\n"), (REPORT_MD, to_markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def _already_gated(
    out: Path, existing: registry.RegisteredVersion, source: registry.PulledModel, policy: Policy
) -> RunResult:
    reason = (
        f"{source.name} version {source.version} was already gated with this policy: sanitized version "
        f"{existing.uri} exists; nothing new was registered"
    )
    report = base_report("gate", "removed", int(ExitCode.BACKDOOR_REMOVED), reason)
    report.update(
        {
            "model": {"source": source.ref.uri, "sha256": source.sha256},
            "registered": {"name": existing.name, "version": existing.version, "uri": existing.uri, "reused": True},
            "policy_sha256": policy.sha256(),
        }
    )
    out.mkdir(parents=True)
    _rewrite_report(out, report)
    return RunResult("removed", ExitCode.BACKDOOR_REMOVED, report, out)


def gate_uri(
    model: str,
    data: Path | None,
    policy: Policy,
    out: Path,
    tracking_uri: str | None = None,
    device: str | None = None,
    progress: StageProgress | None = None,
    artifact_location: str | None = None,
) -> RunResult:
    """``gate`` for a local path or a registry URI (models:/..., runs:/...).

    ``artifact_location`` applies when the policy's experiment has to be created (the demo keeps
    its artifacts under its work directory)."""
    ref = registry.parse_model_uri(model)
    if ref.kind == "local":
        return gate(Path(model), data, policy, out, device, progress, source=model)
    require_new_output(out)
    with tempfile.TemporaryDirectory(prefix="tbar-guard-") as tmp_name:
        tmp = Path(tmp_name)
        source = registry.pull(model, tmp / "source", tracking_uri=tracking_uri)
        target_name = policy.registry.target_name or f"{source.name}-sanitized"
        existing = registry.find_sanitized(
            target_name, f"{source.name}/{source.version}", policy.sha256(), tracking_uri=tracking_uri
        )
        if existing is not None:
            return _already_gated(out, existing, source, policy)
        references = _pull_references(policy, tmp, tracking_uri)
        result = gate(
            source.local_dir,
            data,
            policy,
            out,
            device,
            progress,
            references=references,
            source=model,
        )
        report = dict(result.report)
        try:
            _apply_to_registry(report, result, source, policy, out, tmp, target_name, tracking_uri, artifact_location)
        except BaseException as exc:  # registry failure or interrupt: the local report must not claim success
            report["verdict"] = "error"
            report["exit_code"] = int(ExitCode.ERROR)
            report["registry_error"] = str(exc) or type(exc).__name__
            report["reason"] = (
                f"gate verdict {result.verdict!r}, but updating the registry failed; nothing was promoted"
            )
            _rewrite_report(out, report)
            raise
        _rewrite_report(out, report)
        return RunResult(result.verdict, result.exit_code, report, out)


def _apply_to_registry(
    report: dict[str, Any],
    result: RunResult,
    source: registry.PulledModel,
    policy: Policy,
    out: Path,
    tmp: Path,
    target_name: str,
    tracking_uri: str | None,
    artifact_location: str | None,
) -> None:
    """Register / tag / move the alias according to the verdict; updates ``report`` in place."""
    tags = _audit_tags(report, source, policy)
    alias = policy.registry.alias
    if result.verdict == "removed":
        artifacts = tmp / "artifacts"
        shutil.copytree(out, artifacts, ignore=shutil.ignore_patterns("model"))
        registered = registry.register_sanitized(
            out / "model",
            artifacts,
            target_name,
            tags,
            _metrics(report),
            {"policy_sha256": policy.sha256(), "source_uri": source.ref.uri, "verdict": result.verdict},
            tracking_uri=tracking_uri,
            experiment=policy.registry.experiment,
            artifact_location=artifact_location,
        )
        # Two gates of the same source version at once both find no sanitized version when they
        # start, and both register one. The oldest version wins: a gate that finds an older one
        # with the same source key and policy deletes its own and reports the older one as reused
        # (the gate that made the older one moves the alias).
        try:
            rivals = registry.sanitized_versions(
                target_name, tags[f"{TAG}source_key"], policy.sha256(), tracking_uri=tracking_uri, ready_only=False
            )
        except BaseException:
            with contextlib.suppress(Exception):
                registry.delete_version(registered.name, registered.version, tracking_uri=tracking_uri)
            raise
        older = [v for v in rivals if int(v.version) < int(registered.version)]
        if older:
            registry.delete_version(registered.name, registered.version, tracking_uri=tracking_uri)
            winner = older[0]
            report["registered"] = {
                "name": winner.name,
                "version": winner.version,
                "uri": winner.uri,
                "reused": True,
                "note": f"a concurrent gate registered {winner.uri} first; version {registered.version} was deleted",
            }
            if alias:
                report["alias_moved"] = None
                report["alias_note"] = f"alias {alias!r} is moved by the gate that registered {winner.uri}"
            return
        try:
            registry.set_version_tags(
                str(source.name),
                str(source.version),
                {f"{TAG}verdict": "removed", f"{TAG}sanitized_uri": registered.uri},
                tracking_uri=tracking_uri,
            )
            if alias:  # last: an alias never points at a version whose bookkeeping failed
                registry.move_alias(registered.name, alias, registered.version, tracking_uri=tracking_uri)
        except BaseException:
            with contextlib.suppress(Exception):
                registry.delete_version(registered.name, registered.version, tracking_uri=tracking_uri)
            raise
        report["registered"] = {"name": registered.name, "version": registered.version, "uri": registered.uri}
        if alias:
            report["alias_moved"] = f"{registered.name}@{alias} -> version {registered.version}"
    else:
        registry.set_version_tags(
            str(source.name), str(source.version), {f"{TAG}verdict": result.verdict}, tracking_uri=tracking_uri
        )
        if alias and result.verdict == "clean":
            registry.move_alias(str(source.name), alias, str(source.version), tracking_uri=tracking_uri)
            report["alias_moved"] = f"{source.name}@{alias} -> version {source.version}"
    if alias and "alias_moved" not in report:
        report["alias_moved"] = None
        report["alias_note"] = f"alias {alias!r} was not moved: verdict {result.verdict}"


def _pull_references(policy: Policy, tmp: Path, tracking_uri: str | None) -> list[ClipBundle]:
    refs: list[ClipBundle] = []
    for i, uri in enumerate(policy.detect.reference_models):
        kind = registry.parse_model_uri(uri).kind
        path = Path(uri) if kind == "local" else registry.pull(uri, tmp / f"reference-{i}", tracking_uri).local_dir
        refs.append(load_bundle(path))
    return refs
