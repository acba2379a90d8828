"""Many clients on one device agent at once: every request is answered or refused, none waits
past its timeout + 1 s, and the agent's memory stays flat from one round to the next.

    .venv/bin/python bench/agent_soak.py [--model smollm2-135m] [--target webgpu]
                                         [--clients 16] [--seconds 60] [--rounds 2]

The agent (`tapml device serve`, started here on a free loopback port) serves four kinds of
client, in turn: runners (one session, a prefill and decodes over and over), loaders (a new
session each time: plan, kernels and weights sent, a KV cache read back), askers (`info` on a
connection of their own: its latency while the runners hold the device is the figure to
watch) and abusers (out-of-range requests, oversized uploads, and runs abandoned midway).
Reports requests answered per second, `info` latency p50/p99, and the agent's peak memory and
its growth between rounds. tests/test_agent_robustness.py runs a short version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tapml.errors import DeviceLost, TapmlError
from tapml.plan import CausalLM, Plan
from tapml.targets import backend_for
from tapml.targets.remote import device_info, open_executor, start_local_agent
from tapml.weights import load_shards

ROLES = ("runner", "loader", "asker", "abuser")


class Tally:
    """Outcomes and latencies of every request, by role; thread-safe."""

    def __init__(self, timeout: float):
        self.timeout, self.lock = timeout, threading.Lock()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)

    def time(self, role: str, fn, *args: Any, refusal_expected: bool = False,
             requests: int = 1) -> Any:  # fmt: skip
        """Call fn(*args), which makes `requests` requests (0: some), recording answered /
        refused / lost / late (a single request answered past its timeout + 1 s)."""
        start, result, outcome = time.monotonic(), None, "answered"
        try:
            result = fn(*args)
        except DeviceLost:
            outcome = "lost"
        except TapmlError:
            outcome = "refused"
        elapsed = time.monotonic() - start
        if requests == 1 and elapsed > self.timeout + 1:
            outcome = "late"
        if refusal_expected and outcome == "answered":
            outcome = "not refused"
        with self.lock:
            self.outcomes[role, outcome] += 1
            self.latency[role].append(elapsed)
        return result


def _runner(url: str, target: str, plan: Plan, artifact: Path, params, tally: Tally,
            seconds: float) -> None:  # fmt: skip
    lm = CausalLM(plan)
    with open_executor(url, target, plan, artifact, timeout=tally.timeout) as ex:
        tally.time("runner", ex.load_params, params, requests=0)
        until = time.monotonic() + seconds  # from when its session is ready
        while time.monotonic() < until:
            tally.time("runner", ex.reset_state)
            tally.time("runner", ex.run, *lm.prefill(0, list(range(10, 10 + lm.chunk))))
            for pos in range(lm.chunk, lm.chunk + 4):
                tally.time("runner", ex.run, *lm.decode(pos, 7))


def _loader(url: str, target: str, plan: Plan, artifact: Path, params, tally: Tally,
            seconds: float) -> None:  # fmt: skip
    cache = plan.names("state")[0]
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        ex = tally.time("loader", lambda: open_executor(url, target, plan, artifact,
                                                        timeout=tally.timeout), requests=0)
        if ex is None:
            continue
        with ex:
            tally.time("loader", ex.load_params, params, requests=0)
            tally.time("loader", ex.download, cache, requests=0)


def _asker(url: str, tally: Tally, seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        tally.time("asker", lambda: device_info(url, timeout=tally.timeout))
        time.sleep(0.05)


def _abuser(url: str, target: str, plan: Plan, artifact: Path, tally: Tally,
            seconds: float) -> None:  # fmt: skip
    lm = CausalLM(plan)
    token = plan.task["decode"]["tokens"]
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        with open_executor(url, target, plan, artifact, timeout=tally.timeout) as ex:
            tally.time("abuser", ex.launch, "decode", 0, {"pos": 10**8}, refusal_expected=True)
            tally.time("abuser", ex._call, "run", "decode", json.dumps({"pos": 0}),
                       ((token, np.array([10**8], "int32").tobytes()),),
                       refusal_expected=True)  # fmt: skip
            tally.time("abuser", ex._call, "upload", token, 0, b"\0" * (plan.nbytes(token) + 8),
                       refusal_expected=True)  # fmt: skip
            function, scalars, inputs = lm.prefill(0, [1, 2, 3])
            ex._methods["run"](function, json.dumps(scalars),
                               tuple((n, a.tobytes()) for n, a in inputs.items()))
            time.sleep(0.01)  # leave in the middle of the run: the agent must cancel it


def soak_round(url: str, target: str, plan: Plan, artifact: Path, clients: int, seconds: float,
               timeout: float) -> Tally:  # fmt: skip
    """One round of `clients` clients (the roles in turn) for `seconds`."""
    params = load_shards(Path(artifact) / "weights")
    tally = Tally(timeout)
    work = {
        "runner": lambda: _runner(url, target, plan, artifact, params, tally, seconds),
        "loader": lambda: _loader(url, target, plan, artifact, params, tally, seconds),
        "asker": lambda: _asker(url, tally, seconds),
        "abuser": lambda: _abuser(url, target, plan, artifact, tally, seconds),
    }  # fmt: skip
    threads = [threading.Thread(target=work[ROLES[i % len(ROLES)]], daemon=True)
               for i in range(clients)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10 * timeout)
    if any(t.is_alive() for t in threads):
        tally.outcomes["client", "hung"] += 1
    return tally


class PeakMemory:
    """The agent's resident memory, sampled in a thread: its peak, and its value now."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self._process, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._thread.start()

    def now(self) -> int:
        return self._process.memory_info().rss

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, self.now())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def soak(target: str, artifact: Path, *, clients: int = 16, seconds: float = 60.0,
         rounds: int = 2, timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
    """Soak an agent of `target`'s backend with `rounds` identical rounds; a report."""
    plan = Plan.load(Path(artifact) / "plan.json")
    backend = backend_for(target).name
    report: dict[str, Any] = {"target": target, "clients": clients, "seconds": seconds,
                              "rounds": []}  # fmt: skip
    with start_local_agent(backend, trust_native_code=backend_for(target).native) as url:
        memory = PeakMemory(url.pid)
        try:
            for _ in range(rounds):
                started = time.monotonic()
                tally = soak_round(url, target, plan, artifact, clients, seconds, timeout)
                elapsed = time.monotonic() - started
                time.sleep(0.5)  # the last sessions' buffers go
                asked = sorted(tally.latency["asker"]) or [float("nan")]
                answered = sum(n for (_, o), n in tally.outcomes.items() if o == "answered")
                report["rounds"].append({
                    "outcomes": {f"{r} {o}": n for (r, o), n in sorted(tally.outcomes.items())},
                    "answered_per_s": answered / elapsed,
                    "info_p50_ms": 1e3 * statistics.median(asked),
                    "info_p99_ms": 1e3 * asked[min(len(asked) - 1, int(0.99 * len(asked)))],
                    "rss_mb": memory.now() / 2**20,
                })  # fmt: skip
        finally:
            memory.stop()
        report["peak_rss_mb"] = memory.peak / 2**20
    report["rss_growth_mb"] = report["rounds"][-1]["rss_mb"] - report["rounds"][0]["rss_mb"]
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """What went wrong in a soak: lost, late or hung requests, refusals that did not come."""
    bad = ("lost", "late", "hung", "not refused")
    return [f"{what}: {n}" for r in report["rounds"] for what, n in r["outcomes"].items()
            if what.split(" ", 1)[1] in bad]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="webgpu")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Write the report here too.")
    args = parser.parse_args()
    from tapml.api import artifact_for

    artifact = artifact_for(args.model, args.target, progress=True)
    report = soak(args.target, artifact, clients=args.clients, seconds=args.seconds,
                  rounds=args.rounds)  # fmt: skip
    for i, r in enumerate(report["rounds"]):
        print(f"round {i + 1}: {r['answered_per_s']:.1f} requests answered/s, info p50 "
              f"{r['info_p50_ms']:.1f} ms, p99 {r['info_p99_ms']:.1f} ms, agent RSS "
              f"{r['rss_mb']:.0f} MiB")  # fmt: skip
        for what, n in r["outcomes"].items():
            print(f"  {what}: {n}")
    print(f"peak agent RSS {report['peak_rss_mb']:.0f} MiB; growth between the first and last "
          f"round {report['rss_growth_mb']:+.1f} MiB")  # fmt: skip
    problems = failures(report)
    print("problems: " + ("; ".join(problems) if problems else "none"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
