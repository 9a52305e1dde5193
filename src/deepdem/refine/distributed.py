"""Blocks spread over Dask workers: each builds the model once, the client alone writes."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from typing import Sequence

import numpy as np
import torch

from ..models import DeepDEMRegressionTask
from ..scene import Scene
from .blocks import BlockRefiner
from .layout import Block, RefineSettings
from .output import commit_block


_WORKER_REFINERS: dict[str, BlockRefiner] = {}
_WORKER_LOCK = threading.Lock()


def _worker_refiner(key: str, payload: tuple[dict, dict], scene: Scene, settings: RefineSettings) -> BlockRefiner:
    """The worker's refiner for this model and scene, built once per worker process."""
    with _WORKER_LOCK:
        refiner = _WORKER_REFINERS.get(key)
        if refiner is None:
            model_kwargs, state = payload
            task = DeepDEMRegressionTask(model_kwargs)
            task.load_state_dict(state)
            refiner = BlockRefiner(task, scene, settings)
            _WORKER_REFINERS.clear()  # one model per worker: a new refine replaces the last
            _WORKER_REFINERS[key] = refiner
        return refiner


def _dask_refine_block(key, payload, scene, settings, block) -> tuple[int, np.ndarray]:
    return block.index, _worker_refiner(key, payload, scene, settings).refine_block(block)



def refine_distributed(task, digest, scene, settings, todo: Sequence[Block], works, journal_path, journal,
                        client, workers, scheduler, on_block) -> None:
    """Spread blocks over Dask workers; the client alone writes the file and the journal."""
    from dask.distributed import Client, LocalCluster, as_completed

    own_client = client is None
    cluster = None
    if own_client:
        if scheduler:
            client = Client(scheduler)
        else:
            # One single-threaded process per worker: torch then uses the cores it is given.
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
            n_threads = max(1, (os.cpu_count() or 1) // workers)
            client.run(torch.set_num_threads, n_threads)
    try:
        state = {k: v.detach().cpu() for k, v in task.state_dict().items()}
        # Sent once to every worker; each builds its model from it once (see _worker_refiner).
        payload = client.scatter((dict(task.model_kwargs), state), broadcast=True)
        key = hashlib.sha256(json.dumps([digest, str(scene.path.resolve()), settings.fingerprint()]).encode()).hexdigest()
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        pending = iter(todo)
        by_index = {b.index: b for b in todo}

        def submit(block):
            return client.submit(_dask_refine_block, key, payload, scene, settings, block,
                                 key=f"deepdem-refine-{key[:16]}-{block.index}", pure=False)

        # A bounded number of blocks in flight keeps the client's memory bounded too.
        futures = as_completed([submit(b) for b in itertools.islice(pending, 2 * n_workers)])
        for future in futures:
            index, data = future.result()
            future.release()
            commit_block(works, journal_path, journal, by_index[index], data)
            on_block(index)
            nxt = next(pending, None)
            if nxt is not None:
                futures.add(submit(nxt))
    finally:
        if own_client:
            client.close()
            if cluster is not None:
                cluster.close()
