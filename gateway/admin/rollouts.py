"""Admin routes for rollouts: their state with the evidence behind every decision, and operator actions.

Actions are written as commands to the store; the process holding the controller lease applies them
within a second, so the rollout record keeps a single writer. A command names the record it was given
for (`OperatorCommand.rollout`): it applies to that rollout at most once, and never to a later one.
An action on a rollout that has not started, or has ended, is refused (409) rather than left waiting.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from gateway.admin.auth import WHO
from gateway.admin.control_plane import ControlPlane
from gateway.rollout.controller import FINISHED, spec_digest
from gateway.rollout.records import ACTIONS, OperatorCommand, RolloutRecord, read_record, write_command
from gateway.store.base import Store, StoreUnavailable
from gateway.typed_json import RecordError, WarnOnce

log = logging.getLogger("gateway.admin.rollouts")


def add_rollout_routes(app: web.Application, plane: ControlPlane, store: Store) -> None:
    warned = WarnOnce()  # dashboards poll this route; one warning per bad record is enough

    async def rollouts(request: web.Request) -> web.Response:
        table = plane.table()
        view: dict[str, Any] = {}
        for model in table.models.values() if table is not None else []:
            if model.rollout is None:
                continue
            unreadable: str | None = None
            record: RolloutRecord | None = None
            try:
                record = await read_record(store, model.name)
                warned.forget(model.name)
            except StoreUnavailable as exc:
                return web.json_response({"error": str(exc)}, status=503)
            except RecordError as exc:
                unreadable = str(exc)
                if warned.first(model.name, unreadable):
                    log.warning("rollout of %s: the stored record is unreadable: %s", model.name, exc)
            current = record if record is not None and record.spec == spec_digest(model) else None
            entry: dict[str, Any] = {
                "baseline": model.rollout.baseline,
                "canary": model.rollout.canary,
                "steps": list(model.rollout.steps),
                "split_in_file": dict(model.split),
                "record": current.to_json() if current is not None else None,
                "differs_from_file": current is not None
                and current.state.weight != dict(model.split).get(model.rollout.canary),
            }
            if unreadable is not None:
                entry["record_error"] = unreadable
            view[model.name] = entry
        return web.json_response({"rollouts": view})

    async def act(request: web.Request) -> web.Response:
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
        spec = spec_digest(table.models[model])
        try:
            record = await read_record(store, model)
        except StoreUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)
        except RecordError as exc:
            return web.json_response({"error": f"the rollout record is unreadable: {exc}"}, status=409)
        if record is None or record.spec != spec:
            return web.json_response({"error": f"the rollout of {model} has not started yet"}, status=409)
        if record.state.phase in FINISHED:
            done = record.state.phase.replace("_", " ")
            return web.json_response({"error": f"the rollout of {model} is already {done}"}, status=409)
        try:
            await write_command(store, model, OperatorCommand(time.time_ns(), action, who, record.id))
        except StoreUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)
        plane.audit_log.append(who, f"rollout.{action}", {"model": model})
        answer = {"model": model, "action": action, "accepted": True, "rollout": record.id}
        return web.json_response(answer, status=202)

    app.router.add_get("/api/rollouts", rollouts, allow_head=False)
    app.router.add_post("/api/rollouts/{model}/{action}", act)
