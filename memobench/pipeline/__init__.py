"""The phases of a run, in data-flow order; :class:`memobench.runner.Runner` calls them one after the other.

* :mod:`.plan` — the job list (one :class:`~.plan.Job` per image: role, prompt, seed, sample key), what is cached,
  which jobs this shard owns, the dry-run plan;
* :mod:`.fit` — the mitigation's fit step (sharded: who fits what, and when);
* :mod:`.attack` — the attack's conditioning per target prompt (cached), and the traces the result records;
* :mod:`.generate` — images into the content-addressed image cache, in batches cut at fixed boundaries;
* :mod:`.score` — streamed samples over the cache, the metrics, per-metric records and per-sample rows;
* :mod:`.write` — the result JSON, the per-sample JSONL table and the grids, written atomically.

Each phase reads what the previous ones produced (mostly the cache) and nothing else of the runner, so it can be
run and tested on its own.
"""
