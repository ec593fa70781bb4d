"""Admin routes for rollouts: their state with the evidence behind every decision, and operator actions.

Actions are written as commands to the store; the process holding the controller lease applies them
within a second, so the rollout record keeps a single writer.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from gateway import snapshots
from gateway.controlplane import ControlPlane
from gateway.rollout.controller import command_name, record_name, spec_digest
from gateway.store.base import Store, StoreUnavailable

ACTIONS = ("pause", "resume", "promote", "rollback")


def add_rollout_routes(app: web.Application, plane: ControlPlane, store: Store) -> None:
    async def rollouts(request: web.Request) -> web.Response:
        table = plane.table()
        view: dict[str, Any] = {}
        for model in table.models.values() if table is not None else []:
            if model.rollout is None:
                continue
            try:
                record = await store.get_state(record_name(model.name))
            except StoreUnavailable as exc:
                return web.json_response({"error": str(exc)}, status=503)
            current = record is not None and record.get("spec") == spec_digest(model)
            view[model.name] = {
                "baseline": model.rollout.baseline,
                "canary": model.rollout.canary,
                "steps": list(model.rollout.steps),
                "split_in_file": dict(model.split),
                "record": record if current else None,
                "differs_from_file": current
                and record is not None
                and record["state"]["weight"] != dict(model.split).get(model.rollout.canary),
            }
        return web.json_response({"rollouts": view})

    async def act(request: web.Request) -> web.Response:
        from gateway.admin import WHO

        model, action = request.match_info["model"], request.match_info["action"]
        table = plane.table()
        if action not in ACTIONS:
            return web.json_response(
                {"error": f"unknown action {action!r}; one of {', '.join(ACTIONS)}"}, status=404
            )
        if table is None or model not in table.models or table.models[model].rollout is None:
            return web.json_response(
                {"error": f"model {model!r} has no rollout in the routes file"}, status=404
            )
        who = str(request.get(WHO, "admin"))
        command = {"id": time.time_ns(), "action": action, "who": who}
        try:
            await store.put_state(command_name(model), command)
        except StoreUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)
        snapshots.append_audit(plane.state_dir, who, f"rollout.{action}", {"model": model})
        return web.json_response({"model": model, "action": action, "accepted": True}, status=202)

    app.router.add_get("/api/rollouts", rollouts, allow_head=False)
    app.router.add_post("/api/rollouts/{model}/{action}", act)
