"""A realistic traffic mix against a running BBQRec service (locust, FastHttpUser).

Every simulated user replays one real user of the dataset in time order. On start it posts the
first half of that user's sequence as events (under a user id unique to this run, so histories
start realistic and runs do not mix), then loops over:

- `POST /recommend` from the stored history                           weight 50
- `POST /recommend` with an explicit history: a prefix of another real user's sequence   25
- `POST /events`: the next item of its own sequence                                    24
- `POST /items`: a new item whose per-modality vectors are a real item's features plus
  noise (so its semantic ID is a realistic one), now and then                          1

Environment: `LOADTEST_DATASET` (a dataset directory in the schema of docs/DATA.md; default the
embedded Scientific-mm copy, which must be the bundle's dataset) and `BBQREC_API_KEY` (sent as
`X-API-Key` when set). The bundle's modalities and history bound come from `GET /model`.

    locust -f deploy/loadtest/locustfile.py --host http://127.0.0.1:8000
"""

from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from locust import FastHttpUser, between, events, task
from locust.env import Environment

from training.data import load_dataset

# Items checked against the served catalogue (GET /items/{id}) before the run starts.
CATALOGUE_PROBES = 20
NOISE = 0.05  # relative scale of the noise added to a real item's features for a new item


@dataclass(frozen=True)
class Traffic:
    """What every simulated user draws from: real sequences, item ids and feature rows."""

    run: str  # unique per run: user ids and new item ids carry it
    user_ids: list[str]
    sequences: list[list[str]]
    max_history: int
    modalities: list[dict[str, Any]]  # GET /model: [{"name", "dim", "input"}]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, D) float32
    headers: dict[str, str] = field(default_factory=dict)

    def new_item_features(self, rng: random.Random) -> dict[str, list[float]]:
        """One vector per modality: a random real item's row plus noise, or (for a modality the
        dataset ships no matrix of) a random vector of the right size."""
        out: dict[str, list[float]] = {}
        for modality in self.modalities:
            name, dim = modality["name"], int(modality["dim"])
            noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(dim)
            matrix = self.features.get(name)
            if matrix is not None and matrix.shape[1] == dim:
                row = matrix[rng.randrange(len(matrix))]
                vector = row + NOISE * float(np.linalg.norm(row)) / np.sqrt(dim) * noise
            else:
                vector = noise / np.sqrt(dim)
            out[name] = vector.astype(np.float32).tolist()
        return out


TRAFFIC: Traffic | None = None


def _get_json(url: str, headers: dict[str, str]) -> Any:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@events.test_start.add_listener  # type: ignore[untyped-decorator]  # locust's hook is untyped
def load_traffic(environment: Environment, **_: Any) -> None:
    """Read the dataset and the served model once, and check that they belong together."""
    global TRAFFIC
    host = (environment.host or "").rstrip("/")
    if not host:
        raise SystemExit("locust needs --host (the service's base URL)")
    key = os.environ.get("BBQREC_API_KEY")
    headers = {"X-API-Key": key} if key else {}
    dataset = load_dataset(os.environ.get("LOADTEST_DATASET") or None)
    model = _get_json(f"{host}/model", headers)
    for item in random.Random(0).sample(dataset.item_ids, min(CATALOGUE_PROBES, dataset.num_items)):
        try:
            _get_json(f"{host}/items/{item}", headers)
        except urllib.error.HTTPError as e:
            raise SystemExit(
                f"item {item!r} of {dataset.root} is not served ({e.code}): "
                "LOADTEST_DATASET must be the dataset the bundle was trained on"
            ) from e
    TRAFFIC = Traffic(
        run=uuid.uuid4().hex[:8],
        user_ids=list(dataset.user_ids),
        sequences=[[dataset.item_ids[i] for i in s] for s in dataset.sequences],
        max_history=int(model["max_history"]),
        modalities=list(model["modalities"]),
        features=dict(dataset.features),
        headers=headers,
    )


def _ten_items(payload: Any) -> str | None:
    n = len(payload["items"])
    return None if n == 10 else f"{n} items for k=10"


def _accepted(payload: Any, sent: int) -> str | None:
    return None if payload["accepted"] == sent else f"{payload['accepted']} of {sent} accepted"


class ServiceUser(FastHttpUser):
    """One real dataset user, replayed."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        if TRAFFIC is None:
            raise RuntimeError("test_start did not load the traffic")
        self.traffic = TRAFFIC
        self.rng = random.Random()
        k = self.rng.randrange(len(self.traffic.user_ids))
        self.user_id = f"{self.traffic.user_ids[k]}-{self.traffic.run}"
        self.sequence = self.traffic.sequences[k]
        self.cursor = max(1, len(self.sequence) // 2)
        self._post_events(self.sequence[: self.cursor], name="/events (seed)")

    def _post(
        self,
        path: str,
        body: dict[str, Any],
        name: str,
        expect: int = 200,
        check: Callable[[Any], str | None] = lambda _: None,
    ) -> None:
        """POST and count a failure for a wrong status or a payload `check` objects to."""
        with self.client.post(
            path, json=body, headers=self.traffic.headers, name=name, catch_response=True
        ) as response:
            if response.status_code != expect:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
                return
            problem = check(response.json())
            if problem is not None:
                response.failure(problem)
            else:
                response.success()

    def _post_events(self, items: list[str], name: str = "/events") -> None:
        body = {"events": [{"user_id": self.user_id, "item_id": i} for i in items]}
        self._post("/events", body, name, check=lambda r: _accepted(r, len(items)))

    @task(50)
    def recommend_stored(self) -> None:
        body = {"user_id": self.user_id, "k": 10}
        self._post("/recommend", body, "/recommend (stored history)", check=_ten_items)

    @task(25)
    def recommend_explicit(self) -> None:
        other = self.traffic.sequences[self.rng.randrange(len(self.traffic.sequences))]
        history = other[: self.rng.randint(1, min(len(other), self.traffic.max_history))]
        body = {"user_id": f"anonymous-{self.traffic.run}", "k": 10, "history": history}
        self._post("/recommend", body, "/recommend (explicit history)", check=_ten_items)

    @task(24)
    def event(self) -> None:
        self._post_events([self.sequence[self.cursor % len(self.sequence)]])
        self.cursor += 1

    @task(1)
    def new_item(self) -> None:
        body = {
            "item_id": f"loadtest-{self.traffic.run}-{uuid.uuid4().hex[:12]}",
            "features": self.traffic.new_item_features(self.rng),
        }
        self._post("/items", body, "/items", expect=201)
