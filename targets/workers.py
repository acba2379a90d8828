"""Kernels compile on every core: each is scheduled and code-generated on its own, so worker
processes take them in turn and the compiling process gathers what they make.

The workers are forked for each model's kernels, which they find where the compiling process
left them: TVM cannot serialize every kernel it can compile (its JSON writer crashes on some
hand-written ones), so only kernel names go to a worker and only plain results (an object
file's path, a record) come back. A worker never collects garbage: a cycle it inherited may
hold a device (a wgpu one, say) whose release waits on a thread the fork did not copy.
Elsewhere than on Linux kernels compile in the compiling process, one at a time.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tapml.errors import CompileError, TapmlError

MAX_WORKERS = 8  # by default: each holds a copy of what it changes of the compiling process
WORKERS_ENV = "TAPML_COMPILE_WORKERS"

# (desc, job, kernels, args) of the compile under way: what a forked worker finds
_work: tuple[str, Callable[..., Any], dict[str, Any], tuple] | None = None


def workers() -> int:
    """How many kernels compile at once: $TAPML_COMPILE_WORKERS, or one per core this process
    may run on (at most MAX_WORKERS)."""
    named = os.environ.get(WORKERS_ENV, "").strip()
    if named:
        if not named.isdigit() or int(named) < 1:
            raise CompileError(f"{WORKERS_ENV}={named!r}: give a whole number of workers, 1 or "
                               f"more")  # fmt: skip
        return int(named)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_WORKERS))


def compile_each(job: Callable[..., Any], kernels: dict[str, Any], *args: Any, desc: str,
                 progress: bool = False, here: bool = False) -> dict[str, Any]:  # fmt: skip
    """{name: job(name, func, *args)} for each kernel (name -> PrimFunc), in the kernels'
    order; what `job` returns must pickle, unless `here` keeps the work in this process. The
    first error stops the rest."""
    global _work
    from tqdm import tqdm

    n = 1 if here else min(workers(), len(kernels))
    done = {}
    with tqdm(total=len(kernels), desc=desc, unit="kernel", disable=not progress) as bar:
        if n < 2 or sys.platform != "linux":  # macOS's system libraries do not survive a fork
            for name, func in kernels.items():
                done[name] = _named(desc, job, name, func, *args)
                bar.update()
            return done
        _work = desc, job, kernels, args
        try:
            # the workers fork at the first submit, after _work is set
            fork = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(n, mp_context=fork, initializer=gc.disable) as pool:
                futures = [pool.submit(_compile, name) for name in kernels]
                try:
                    for future in as_completed(futures):
                        name, result = future.result()
                        done[name] = result
                        bar.update()
                finally:
                    for future in futures:
                        future.cancel()
        except BrokenProcessPool as e:
            raise CompileError(f"a process compiling kernels died ({desc}): {e}") from None
        finally:
            _work = None
    return {name: done[name] for name in kernels}


def _compile(name: str) -> tuple[str, Any]:
    """In a worker: the named kernel of the compile under way."""
    desc, job, kernels, args = _work
    return name, _named(desc, job, name, kernels[name], *args)


def _named(desc: str, job: Callable[..., Any], name: str, func: Any, *args: Any) -> Any:
    """job(name, func, *args), its failure a CompileError naming the kernel (TVM's own error
    types do not cross from a worker)."""
    try:
        return job(name, func, *args)
    except TapmlError:
        raise
    except Exception as e:
        raise CompileError(f"{desc}: kernel {name} failed: {type(e).__name__}: {e}") from None
