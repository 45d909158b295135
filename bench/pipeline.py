"""Pipeline overhead and quick-profile quality: `medexperts bench pipeline [--profile quick]`.

Runs the retrain flow in an isolated store (temp artifacts + MLflow), times the whole flow against the
compute inside the stages (sources, data, foundation, experts, decompose, fusion, evaluate), then runs it
again with nothing changed. Writes bench/results/pipeline.json (`--result NAME`: bench/results/NAME.json).

`--work DIR` keeps the store in DIR instead of a temporary folder, so a run longer than one sitting (the full
profile on CPU: most of a day) can be stopped and started again: finished stages are skipped and a stage stopped
mid-training resumes from its last epoch's checkpoint (the pipeline's own resume). Every invocation is recorded
in DIR/invocations.json (its commit, its start, and a heartbeat every 15 s, so an invocation that was killed still
shows how long it ran); a stage finished by a resumed invocation reports the compute of that invocation only, and
the result lists which stages were finished by which invocation and the wall time summed over all of them.
"""

from __future__ import annotations

import argparse
import atexit
import calendar
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench.common import ROOT, git_commit, write_result

# The stages that compute: every stage of the flow but promote (registration, counted as overhead); sources hashes
# the inputs outside the project.
OVERHEAD_STAGES = ("promote",)
STAMP = "%Y-%m-%dT%H:%M:%SZ"  # the invocation record's UTC times
HEARTBEAT_SECONDS = 15.0  # a stop by signal ends the process without Python clean-up: the heartbeat is its record


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench pipeline", description=__doc__)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--work", type=Path, help="keep the run's store here and resume it (default: a temp folder)")
    parser.add_argument("--result", default="pipeline", help="bench/results/RESULT.json")
    parser.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a param, as `medexperts run --set` (repeatable), e.g. data.active=[...]")
    args = parser.parse_args()
    from components.config import load_params
    from components.core.errors import MedExpertsError
    from flows.cli import parse_sets

    try:  # bad params fail here, in one line, before anything is recorded
        args.overrides = parse_sets(args.sets)
        args.resolved = load_params(ROOT / "params", args.profile, args.overrides).model_dump(mode="json")
    except MedExpertsError as err:
        raise SystemExit(f"medexperts bench pipeline: {err}") from None
    tmp = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="medexperts-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    from components.core.lock import LOCK_FILE, ProjectBusy, describe, holder, project_lock

    try:
        with project_lock(tmp, wait=False, what="medexperts bench pipeline"):  # one invocation per DIR at a time
            _measure(args, tmp)
    except ProjectBusy:
        raise SystemExit(f"{tmp} is in use by another invocation ({describe(holder(tmp / LOCK_FILE))}); "
                         "wait for it to finish or stop it") from None
    finally:
        if not args.work:  # a temporary store (186 MB for the quick profile): nothing can resume it
            shutil.rmtree(tmp, ignore_errors=True)


def _measure(args: argparse.Namespace, tmp: Path) -> None:
    invocations = _invocations(tmp)
    invocations.append({"started": _now(), "profile": args.profile, "overrides": args.overrides,
                        "git_commit": git_commit()})
    _save_invocations(tmp, invocations)
    beat = _Heartbeat(tmp, invocations)
    beat.start()
    # The flow runs against a temporary store; the result itself is logged to the user's store (write_result).
    keys = ("MEDEXPERTS_PROJECT_DIR", "MEDEXPERTS_ARTIFACTS_DIR", "MEDEXPERTS_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI",
            "PREFECT_HOME", "PREFECT_API_URL", "MEDEXPERTS_PREFECT_OWNED", "MEDEXPERTS_PREFECT_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"MEDEXPERTS_PROJECT_DIR": str(ROOT), "MEDEXPERTS_ARTIFACTS_DIR": str(tmp / "artifacts"),
                       "MEDEXPERTS_ARTIFACT_ROOT": (tmp / "mlruns").as_uri(),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"})
    if args.work:
        os.environ["PREFECT_HOME"] = str(tmp / ".prefect")
        os.environ.pop("MEDEXPERTS_PREFECT_PORT", None)  # that port is the project's server's, not this run's
    from flows.environment import configure

    configure(ROOT)  # before Prefect is imported: its settings (home, analytics off) are read at import
    if args.work:
        # A run kept in DIR spans sittings, so it talks to a Prefect server of its own (state in DIR/.prefect, started
        # in its own session by flows.services, reused by the next invocation). Prefect's temporary server is this
        # process's child: a Ctrl-C or a `kill` of the process group stops it first, and the stopping flow then
        # retries it for minutes before it exits.
        from flows.services import ensure_prefect_server

        print(f"Prefect server of this run: {ensure_prefect_server(tmp, port=0)} (it outlives a stop; "
              f"`PREFECT_HOME={tmp / '.prefect'} medexperts services down` stops it)", flush=True)
    from flows.retrain import retrain
    from flows.stages import ORDER

    compute_stages = [s for s in ORDER if s not in OVERHEAD_STAGES]

    try:
        start = time.perf_counter()
        results = retrain(profile=args.profile, overrides=args.overrides)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        retrain(profile=args.profile, overrides=args.overrides)
        unchanged = time.perf_counter() - start
    except BaseException as stopped:  # a stop (SIGTERM, Ctrl-C) or a failure: record how long this one ran
        beat.stop({"last_seen": _now(), "stopped": f"{type(stopped).__name__}: {stopped}"[:300]})
        raise

    ran = [s for s in compute_stages if not results[s].get("cached")]
    beat.stop({"finished": _now(), "flow_wall_seconds": wall, "stages_run": ran})
    per_stage = {s: results[s]["compute_seconds"] for s in compute_stages}  # a skipped stage: the run that made it
    compute = sum(per_stage.values())
    # Overhead is this invocation's wall time less the compute of the stages it ran: on a run resumed across
    # invocations, the stages finished earlier count in `compute` but not in `wall`.
    overhead = wall - sum(per_stage[s] for s in ran)
    ev = results["evaluate"]
    metric = ev["metric"]
    tasks = {t: {"probe": r["metrics"]["probe"][metric], "expert": r["metrics"]["expert"][metric],
                 "fused": r["metrics"].get("fused", {}).get(metric), "normalised": r["normalised"],
                 "expert_stored_bytes": r["params"]["stored_bytes"], "trainable_params": r["params"]["trainable"],
                 "foundation_params": r["params"]["foundation"],
                 "latency_ms_per_sample": r["latency_ms_per_sample"], "merge_max_abs_diff": r["merge_max_abs_diff"],
                 "test_samples": r["test_samples"],
                 "models": {name: m[metric] for name, m in r["metrics"].items()},  # every model scored on test
                 "metrics": r["metrics"], "params": r["params"]}  # every metric; every model's parameter count
             for t, r in ev["tasks"].items()}
    payload = {
        "params": {"profile": args.profile, "overrides": args.overrides, "metric": metric, "result": args.result,
                   "resolved": args.resolved},  # every param the run used (the profile as it was at this commit)
        "invocations": invocations,
        "figures": {"flow_wall_seconds": wall, "stage_compute_seconds": compute, "per_stage_compute_seconds": per_stage,
                    "invocations_wall_seconds": invocations_wall_seconds(invocations),
                    "overhead_seconds": overhead, "overhead_fraction": overhead / wall,
                    "unchanged_rerun_seconds": unchanged,
                    "every_expert_beats_probe": all(v["expert"] > v["probe"] for v in tasks.values())},
        "tasks": tasks,
        "fusion": {k: results["fusion"].get(k) for k in ("best_method", "methods", "curves")},
        "registry": results["promote"]["decisions"],
    }
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    path = write_result(args.result, payload)
    if args.work:  # the run is complete, nothing will resume it: its server stops once Prefect has sent what it holds
        atexit.register(_stop_server, tmp)
    print(f"flow {wall:.1f}s, stage compute {compute:.1f}s, overhead {100 * overhead / wall:.1f}%, "
          f"unchanged re-run {unchanged:.1f}s")
    for t, v in tasks.items():
        print(f"  {t:20s} probe {v['probe']:.3f}  expert {v['expert']:.3f}  fused {v['fused'] if v['fused'] is None else round(v['fused'], 3)}")
    print(f"wrote {path}")


def _now() -> str:
    return time.strftime(STAMP, time.gmtime())


def _seconds(stamp: str) -> int:
    return calendar.timegm(time.strptime(stamp, STAMP))


def invocations_wall_seconds(invocations: list[dict]) -> float:
    """Wall time summed over the invocations: each from its start to its finish, or, for one that was stopped, to its
    last heartbeat (an invocation recorded before heartbeats existed, stopped, counts nothing: it is unknown)."""
    return float(sum(_seconds(end) - _seconds(i["started"]) for i in invocations
                     if (end := i.get("finished") or i.get("last_seen"))))


class _Heartbeat:
    """Writes ``last_seen`` into the running invocation's record every HEARTBEAT_SECONDS, from a daemon thread, so a
    killed invocation (a reboot, a session's end) still says how long it ran; ``stop`` records its end. Only the
    thread writes until ``stop`` has joined it, so the record needs no lock."""

    def __init__(self, work: Path, invocations: list[dict]) -> None:
        self.work, self.invocations, self.done = work, invocations, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="bench-heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_SECONDS):
            self._update({"last_seen": _now()})

    def _update(self, fields: dict) -> None:
        self.invocations[-1] |= fields
        _save_invocations(self.work, self.invocations)

    def stop(self, fields: dict) -> None:
        self.done.set()
        self.thread.join()
        self._update(fields)


def _stop_server(work: Path) -> None:
    """At exit (after Prefect's own exit hooks have sent its last logs and events): stop the run's server (state in
    WORK/.prefect); a failure is reported, never raised (the result is written already)."""
    from flows.services import ServiceError, stop_prefect_server

    os.environ["PREFECT_HOME"] = str(work / ".prefect")  # the user's own PREFECT_HOME was restored before exit
    try:
        stop_prefect_server(work)
    except (ServiceError, OSError) as err:
        print(f"the run's Prefect server was not stopped: {err}")


def _invocations(work: Path) -> list[dict]:
    """The invocations recorded in ``work`` so far (none in a fresh folder)."""
    from components.core.artifacts import read_json

    path = work / "invocations.json"
    return read_json(path, "bench invocations record", expect=list) if path.is_file() else []


def _save_invocations(work: Path, invocations: list[dict]) -> None:
    from components.core.artifacts import write_json

    write_json(work / "invocations.json", invocations)


if __name__ == "__main__":
    main()
