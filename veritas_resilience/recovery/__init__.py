"""Alert-driven recovery: Prometheus rules, a Grafana dashboard, and an Alertmanager receiver.

The rules (``rules/*.yml``, with their ``promtool test rules`` files) and the dashboard
(``grafana/veritas-resilience.json``) ship in the package; ``veritas-resilience rules`` prints
them, adapted to a deployment. The receiver runs recovery actions when an alert fires::

    from veritas_resilience.recovery import Recovery, isolate_breaker

    recovery = Recovery(token=os.environ["RECOVERY_TOKEN"], journal="recovery.jsonl")
    recovery.on("VeritasBreakerOpen", isolate_breaker(registry), cooldown=300)
    app = recovery.asgi()  # POST /alerts: point Alertmanager's webhook_configs here

See docs/operations.md for the Alertmanager configuration and docs/runbooks.md for the alerts.
"""

from __future__ import annotations

from ._actions import Action as Action
from ._actions import BuiltinAction as BuiltinAction
from ._actions import Step as Step
from ._actions import isolate_breaker as isolate_breaker
from ._actions import reprobe_postgres as reprobe_postgres
from ._actions import reset_breaker as reset_breaker
from ._actions import sentinel_failover as sentinel_failover
from ._actions import serve_stale as serve_stale
from ._actions import webhook as webhook
from ._asgi import ReceiverApp as ReceiverApp
from ._errors import PayloadError as PayloadError
from ._events import AlertsTruncated as AlertsTruncated
from ._events import NotificationRejected as NotificationRejected
from ._events import RecoveryDecision as RecoveryDecision
from ._payload import Alert as Alert
from ._payload import Notification as Notification
from ._payload import parse_notification as parse_notification
from ._recovery import Recovery as Recovery
from ._recovery import RecoveryRule as RecoveryRule
from ._rules import RULE_GROUPS as RULE_GROUPS
from ._rules import dashboard_json as dashboard_json
from ._rules import render_dashboard as render_dashboard
from ._rules import render_rules as render_rules
from ._rules import rule_files as rule_files

__all__ = [
    "Action",
    "Alert",
    "AlertsTruncated",
    "BuiltinAction",
    "Notification",
    "NotificationRejected",
    "PayloadError",
    "RULE_GROUPS",
    "ReceiverApp",
    "Recovery",
    "RecoveryDecision",
    "RecoveryRule",
    "Step",
    "dashboard_json",
    "isolate_breaker",
    "parse_notification",
    "render_dashboard",
    "render_rules",
    "reprobe_postgres",
    "reset_breaker",
    "rule_files",
    "sentinel_failover",
    "serve_stale",
    "webhook",
]
