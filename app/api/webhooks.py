"""/v1/webhooks: a tenant's endpoints, their delivery log and redelivery (docs/service-contract.md, "Webhooks").

An endpoint is told of its tenant's job transitions (``job.queued``, ``job.running``, ``job.succeeded``,
``job.failed``, ``job.cancelled``), checkpoints (``job.checkpoint``) and evaluation results (``job.evaluated``),
signed in the Standard Webhooks format with the secret shown once, in the answer to its creation. The URL must
resolve to public addresses unless the deployment allows private ones (``app/webhooks/targets.py``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import DbDep, PrincipalDep, SettingsDep
from app.api.errors import ApiError, error_responses, invalid_request
from app.db import models as orm
from app.db import webhooks as webhook_rows
from app.db.engine import Database
from app.settings import Settings
from app.webhooks.targets import MAX_URL_LENGTH, TargetRefused, check_url
from ctpd_core.spec import NO_NUL_PATTERN
from ctpd_core.vocab import WebhookEventType

logger = logging.getLogger(__name__)

MAX_DESCRIPTION = 500

router = APIRouter(
    prefix="/v1/webhooks", tags=["webhooks"],
    # Every route checks the API key (401), validates its body and parameters (422) and reads the database (503).
    responses=error_responses((401, 422, 503)),
)

_ERRORS = error_responses((404,), {404: "No such webhook for this API key's tenant (`not_found`)."})

Url = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH, pattern=NO_NUL_PATTERN,
                           description="Where to POST: https (or http), resolving to public addresses unless the "
                           "deployment allows private ones (CTPD_WEBHOOK_ALLOW_PRIVATE_TARGETS).")]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION, pattern=NO_NUL_PATTERN,
                                   description="A label, e.g. what the receiver does.")]
EventTypes = Annotated[list[WebhookEventType], Field(min_length=1, description="The event types to receive.")]


class Webhook(BaseModel):
    object: Literal["webhook"] = "webhook"
    id: str
    url: str
    event_types: list[WebhookEventType]
    description: str | None
    enabled: bool
    disabled_reason: str | None = Field(description="Why the endpoint is disabled: a run of failed attempts, or a PATCH.")
    disabled_at: datetime | None
    consecutive_failures: int = Field(description="Failed delivery attempts since the last delivered one.")
    created_at: datetime


class CreatedWebhook(Webhook):
    secret: str = Field(description="`whsec_<base64>`: the signing secret (Standard Webhooks), shown this once. "
                        "Verify with `standardwebhooks.Webhook(secret).verify(body, headers)`.")


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Webhook]
    has_more: bool = False


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url
    event_types: EventTypes | None = Field(default=None, description="The event types to receive; leave it out for all.")
    description: Description | None = None


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(default=None, description="true re-enables a disabled endpoint and ends its run of "
                                 "failures (its pending messages go out again); false stops deliveries.")
    event_types: EventTypes | None = None
    url: Url | None = Field(default=None, description="A new URL; checked as on creation.")
    description: Description | None = None


class WebhookDelivery(BaseModel):
    id: int = Field(description="The log's cursor: pass the last one of a page as `after`.")
    message_id: str = Field(description="The `webhook-id` header: the same on every attempt of one message.")
    event_type: WebhookEventType
    job_id: str | None
    attempt: int = Field(description="1 for the first attempt of the message, 2 for its first retry, ...")
    status_code: int | None = Field(description="The receiver's HTTP status; null when no answer came.")
    latency_ms: float | None
    outcome: Literal["delivered", "failed", "gave_up", "endpoint_disabled"] = Field(
        description="delivered (2xx); failed (retried at `next_attempt_at`); gave_up (failed, and the retry window "
        "is over); endpoint_disabled (this failure disabled the endpoint: see its `disabled_reason`).")
    error: str | None = Field(description="Why the attempt failed: the HTTP status, a timeout, a refused address, ...")
    attempted_at: datetime
    next_attempt_at: datetime | None


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDelivery]
    has_more: bool = Field(description="Pass the last entry's id as `after` for the next page.")


class Redelivery(BaseModel):
    object: Literal["webhook.redelivery"] = "webhook.redelivery"
    webhook_id: str
    message_id: str = Field(description="The `webhook-id` the message goes out with again.")


def webhook_object(row: orm.Webhook) -> Webhook:
    return Webhook(id=row.id, url=row.url, event_types=[WebhookEventType(kind) for kind in row.event_types],
                   description=row.description, enabled=row.enabled, disabled_reason=row.disabled_reason,
                   disabled_at=row.disabled_at, consecutive_failures=row.consecutive_failures,
                   created_at=row.created_at)


def _checked_url(url: str, settings: Settings) -> str:
    try:
        check_url(url, allow_private=settings.webhook_allow_private_targets)
    except TargetRefused as refused:
        raise invalid_request([("url", str(refused))]) from None
    return url


def _webhook_for(db: Database, webhook_id: str, tenant: str) -> orm.Webhook:
    row = webhook_rows.get_webhook(db, webhook_id, tenant)
    if row is None:
        raise ApiError(404, "not_found", f"no webhook {webhook_id!r} for this API key", "webhook_id")
    return row


# ------------------------------------------------------------------------------------------- endpoints


@router.post(
    "", operation_id="create_webhook", status_code=201, response_model=CreatedWebhook, summary="Create a webhook",
    description=(
        "The answer carries the signing `secret`: the only time it is shown. Every message is a POST of "
        "`{\"type\", \"timestamp\", \"data\": {\"job_id\", \"status\", \"attempt\", ...}}` with the Standard Webhooks "
        "headers `webhook-id` (the same on every retry: deduplicate on it), `webhook-timestamp` and "
        "`webhook-signature`. A URL that resolves to a loopback, link-local, private or otherwise non-public "
        "address is a 422 unless the deployment sets CTPD_WEBHOOK_ALLOW_PRIVATE_TARGETS."
    ),
)
def create_webhook(body: WebhookCreate, principal: PrincipalDep, db: DbDep, settings: SettingsDep) -> CreatedWebhook:
    url = _checked_url(body.url, settings)
    created = webhook_rows.create_webhook(db, tenant=principal.tenant, url=url, event_types=body.event_types,
                                          description=body.description)
    logger.info("webhook %s created for tenant %s", created.row.id, principal.tenant)
    return CreatedWebhook(**webhook_object(created.row).model_dump(), secret=created.secret)


@router.get("", operation_id="list_webhooks", response_model=WebhookList, summary="List webhooks",
            description="The tenant's endpoints, oldest first.")
def list_webhooks(principal: PrincipalDep, db: DbDep) -> WebhookList:
    return WebhookList(data=[webhook_object(row) for row in webhook_rows.list_webhooks(db, principal.tenant)])


@router.get("/{webhook_id}", operation_id="get_webhook", response_model=Webhook, summary="Get a webhook",
            responses=_ERRORS)
def get_webhook(webhook_id: str, principal: PrincipalDep, db: DbDep) -> Webhook:
    return webhook_object(_webhook_for(db, webhook_id, principal.tenant))


@router.patch(
    "/{webhook_id}", operation_id="update_webhook", response_model=Webhook, summary="Change a webhook",
    description="Only the fields given change. `enabled: true` re-enables a disabled endpoint and ends its run of "
                "failures; a new `url` is checked as on creation.",
    responses=_ERRORS,
)
def update_webhook(webhook_id: str, body: WebhookUpdate, principal: PrincipalDep, db: DbDep,
                   settings: SettingsDep) -> Webhook:
    _webhook_for(db, webhook_id, principal.tenant)
    url = _checked_url(body.url, settings) if body.url is not None else None
    changes = {"description": body.description} if "description" in body.model_fields_set else {}
    row = webhook_rows.update_webhook(db, webhook_id, principal.tenant, enabled=body.enabled,
                                      event_types=body.event_types, url=url, **changes)
    if row is None:  # deleted meanwhile
        raise ApiError(404, "not_found", f"no webhook {webhook_id!r} for this API key", "webhook_id")
    return webhook_object(row)


@router.delete("/{webhook_id}", operation_id="delete_webhook", status_code=204, response_class=Response,
               summary="Delete a webhook", description="No more messages are sent; its log is deleted with it.",
               responses={204: {"description": "Deleted."}, **_ERRORS})
def delete_webhook(webhook_id: str, principal: PrincipalDep, db: DbDep) -> Response:
    if not webhook_rows.delete_webhook(db, webhook_id, principal.tenant):
        raise ApiError(404, "not_found", f"no webhook {webhook_id!r} for this API key", "webhook_id")
    return Response(status_code=204)


@router.get(
    "/{webhook_id}/deliveries", operation_id="list_webhook_deliveries", response_model=WebhookDeliveryList,
    summary="List a webhook's delivery attempts",
    description="Newest first: each attempt with its message (`message_id` is the `webhook-id`), the receiver's "
                "status code, the latency and the outcome; the endpoint's disabling is an entry too.",
    responses=_ERRORS,
)
def list_webhook_deliveries(
    webhook_id: str,
    principal: PrincipalDep,
    db: DbDep,
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1, description="Only entries older than this id.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
) -> WebhookDeliveryList:
    _webhook_for(db, webhook_id, principal.tenant)
    views, has_more = webhook_rows.list_deliveries(db, webhook_id, after=after, limit=limit)
    return WebhookDeliveryList(has_more=has_more, data=[
        WebhookDelivery(id=view.row.id, message_id=view.row.message_id, event_type=WebhookEventType(view.event_type),
                        job_id=view.job_id, attempt=view.row.attempt, status_code=view.row.status_code,
                        latency_ms=view.row.latency_ms, outcome=view.row.outcome,  # type: ignore[arg-type]
                        error=view.row.error, attempted_at=view.row.attempted_at,
                        next_attempt_at=view.row.next_attempt_at)
        for view in views
    ])


@router.post(
    "/{webhook_id}/deliveries/{message_id}/redeliver", operation_id="redeliver_webhook_message", status_code=202,
    response_model=Redelivery, summary="Send a message again",
    description="The message goes out again, with the same `webhook-id` and body (a fresh timestamp and "
                "signature), and is retried as a new one would be: now, or, while an attempt of it is in flight, "
                "as soon as that attempt ends.",
    responses={**error_responses((404, 409), {
        404: "No such webhook, or no such message of it (`not_found`).",
        409: "The webhook is disabled (`webhook_disabled`): enable it first with PATCH {\"enabled\": true}.",
    })},
)
def redeliver_webhook_message(webhook_id: str, message_id: str, principal: PrincipalDep, db: DbDep) -> Redelivery:
    row = _webhook_for(db, webhook_id, principal.tenant)
    if not row.enabled:
        raise ApiError(409, "webhook_disabled", f"webhook {webhook_id} is disabled ({row.disabled_reason}); enable it "
                       "with PATCH /v1/webhooks/{id} {\"enabled\": true}, then redeliver", "webhook_id")
    if not webhook_rows.redeliver(db, webhook_id, message_id):
        raise ApiError(404, "not_found", f"webhook {webhook_id} has no message {message_id!r}; the message_id of "
                       "GET /v1/webhooks/{id}/deliveries names one", "message_id")
    return Redelivery(webhook_id=webhook_id, message_id=message_id)
