"""What GetPlacement reports for each worker's state, from the controller's own bookkeeping, the ids new
workers get, and a plan change's reason checked before anything else (the Controller class used in-process,
without Ray: these only read the plan and the states). tests/cluster/test_elastic.py sees the same states on
a real cluster."""

from __future__ import annotations

import asyncio

import pytest

from cluster.controller import Controller, RouterEntry
from cluster.planner import round_robin_plan, worker_name
from cluster.settings import ClusterSettings
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.placement import PlacementPlan, WorkerPlacement


def states(controller: Controller) -> dict[str, str]:
    return {w.actor_name: admin_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_")
            for w in controller.placement().workers}


def test_placement_reports_starting_draining_and_dead_workers():
    controller = Controller(ClusterSettings(model="unused", num_workers=3).model_dump())
    controller.plan = round_robin_plan((1, 2), 4, 3)
    assert states(controller) == {worker_name(w): "READY" for w in range(3)}
    # a rollout that starts worker 3 and drains worker 2, while worker 0 was reported dead
    controller.starting[3] = WorkerPlacement(3, worker_name(3), ((1, 0), (2, 1)))
    controller.worker_states[2] = admin_pb2.WORKER_STATE_DRAINING
    controller.worker_states[0] = admin_pb2.WORKER_STATE_DEAD
    assert states(controller) == {"expert-worker-0": "DEAD", "expert-worker-1": "READY",
                                  "expert-worker-2": "DRAINING", "expert-worker-3": "STARTING"}
    starting = controller.placement().workers[-1]
    assert [(r.layer, r.expert) for r in starting.replicas] == [(1, 0), (2, 1)]  # what it will host
    assert controller.placement().plan_version == controller.plan.version  # not in the plan yet


def test_new_workers_never_reuse_an_id():
    """The planner numbers new workers after the current plan's; the controller renumbers them past every id
    it ever used, so a scale-out after a scale-in does not start an actor under the name just stopped."""
    controller = Controller(ClusterSettings(model="unused", num_workers=3).model_dump())
    three = round_robin_plan((1, 2), 4, 3)
    controller._next_worker_id = 3
    two = PlacementPlan(2, 4, (1, 2), three.workers[:2])  # worker 2 drained
    assert controller._with_fresh_ids(three, two) is two  # no new worker: the plan as planned
    again = PlacementPlan(3, 4, (1, 2), (*two.workers, WorkerPlacement(2, worker_name(2), three.workers[2].replicas)))
    renumbered = controller._with_fresh_ids(two, again)
    assert [(w.worker_id, w.name) for w in renumbered.workers] == [(0, worker_name(0)), (1, worker_name(1)),
                                                                   (3, worker_name(3))]
    assert renumbered.workers[2].replicas == three.workers[2].replicas and renumbered.version == 3
    assert controller._next_worker_id == 4


def test_a_plan_change_reason_is_a_plan_change_reason():
    controller = Controller(ClusterSettings(model="unused", num_workers=3).model_dump())
    with pytest.raises(ValueError, match=r"reason: 'bench: skewed load' is not a PlanChangeReason.*'manual'"):
        asyncio.run(controller.rebalance("bench: skewed load"))
    with pytest.raises(ValueError, match="num_workers"):
        asyncio.run(controller.rebalance("manual", num_workers=0))


def test_routers_on_one_address_count_ports_up_and_each_node_starts_from_the_base():
    """Routers on different nodes listen on the same ports (one Service port on Kubernetes); routers that share an
    address (several per node, or several Ray nodes on one machine) count up from them, past ports in use."""
    controller = Controller(ClusterSettings(model="unused", port=50051, http_port=8000).model_dump())
    a = RouterEntry(0, "node-a", "10.0.0.1", 50051, 8000)
    assert controller._router_ports("10.0.0.2", [a]) == (50051, 8000)
    assert controller._router_ports("10.0.0.1", [a]) == (50052, 8001)
    c = RouterEntry(2, "node-a", "10.0.0.1", 50053, 8002)  # router 1 (50052) was dropped: its ports are free again
    assert controller._router_ports("10.0.0.1", [a, c]) == (50052, 8001)
    free = Controller(ClusterSettings(model="unused", port=0, http_port=None).model_dump())
    assert free._router_ports("10.0.0.1", [a]) == (0, None)  # 0: each router picks a free port; HTTP off
