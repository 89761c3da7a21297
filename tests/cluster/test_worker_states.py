"""What GetPlacement reports for each worker's state, from the controller's own bookkeeping (the
Controller class used in-process, without Ray: `placement()` only reads the plan and the states)."""

from __future__ import annotations

from cluster.controller import Controller
from cluster.planner import round_robin_plan, worker_name
from cluster.settings import ClusterSettings
from router_service.api import cluster_admin_pb2 as admin_pb2
from router_service.placement import WorkerPlacement


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
