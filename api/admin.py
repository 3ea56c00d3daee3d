"""Admin endpoints: API keys, plans and policies, the dry-run of a policy, and the audit trail. Admin token only.

Every change is written to the registry (a compacted Kafka topic, `processors.registry`) before it is
answered, and applied in this process at once; other processes pick it up within a second. Every change
is recorded in the audit trail (`api.audit`) with the admin credential's name. A new key is returned once,
in the response to its creation; only its key id (a keyed hash) is stored.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from throttlex.api.audit import AuditRecord, AuditTrail
from throttlex.api.auth import admin
from throttlex.api.usage import Instant, store_answer
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.keys import NAME_PATTERN, KeyRecord
from throttlex.processors.core.dry_run import TooManyEvents, replay_stored
from throttlex.processors.core.policy import Plan, Policy, PolicySet, parse_policies
from throttlex.processors.policy_watch import PolicySource
from throttlex.processors.registry import KeyConflict, KeyRevoked, PoliciesConflict, Registry, RegistryLag, issue_key
from throttlex.processors.accounting.store import UsageStore

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin)])


def _encodable(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return text


_Name = Annotated[str, Field(pattern=NAME_PATTERN)]
_Label = Annotated[str, Field(max_length=128), AfterValidator(_encodable)]
_KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{24}$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyCreate(_Body):
    tenant: _Name
    plan: _Name | None = Field(None, description="one of the plans; default: the default plan")
    name: _Label = Field("", description="what the key is for")
    expires_at: Instant | None = Field(None, description="when the key stops working; default: never")


class KeyChange(_Body):
    plan: _Name | None = None
    status: Literal["active", "suspended"] | None = Field(None, description="suspend a key, or make it active again")
    name: _Label | None = None
    expires_at: Instant | None = None


class KeyInfo(BaseModel):
    key_id: str
    tenant: str
    plan: str | None = Field(description="null: the default plan")
    name: str
    status: str
    expires_at: datetime | None
    created_at: datetime
    hint: str = Field(description="the key's last four characters")
    version: int = Field(description="one more with each change; send it as If-Match to change the key only if unchanged")


class NewKey(KeyInfo):
    key: str = Field(description="the API key; shown this once, stored nowhere")


class KeyPage(BaseModel):
    keys: list[KeyInfo]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


_READ_VERSION = Field(None, description="the version read, as If-Match gives it (If-Match wins when both are sent)")


class Plans(_Body):
    plans: dict[_Name, Plan]
    default_plan: str | None = None
    version: int | None = _READ_VERSION


class Policies(_Body):
    policies: list[Policy]
    version: int | None = _READ_VERSION


_VERSION = Field(
    description="the version of the document holding plans and policies (0: none put yet); one more with each change "
    "of either; send it as If-Match to change them only if unchanged"
)


class PlansInForce(Plans):
    version: int = _VERSION


class PlansChanged(PlansInForce):
    keys_not_moved: list[str] = Field(
        default_factory=list, description="with move_keys_to: keys a concurrent change kept from moving (move them by PATCH)"
    )


class PoliciesInForce(Policies):
    origin: Literal["file", "registry"] = Field(description="where they come from: the policy file until one is put here")
    version: int = _VERSION


class BlockInterval(BaseModel):
    start: datetime
    until: datetime
    seconds: float


class KeyBacktest(BaseModel):
    limit_key: str
    blocked_s: float
    blocks: list[BlockInterval]


class DryRun(BaseModel):
    policy: str
    start: datetime
    end: datetime
    events_replayed: int
    keys: list[KeyBacktest] = Field(description="the keys the policy would have blocked, most blocked first")


class DryRunRequest(_Body):
    policy: Policy
    start: Instant = Field(alias="from")
    end: Instant = Field(alias="to")


def _instant(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)  # an `Instant`: always in UTC


def key_info(record: KeyRecord) -> KeyInfo:
    return KeyInfo(
        key_id=record.key_id, tenant=record.tenant, plan=record.plan or None, name=record.name, status=record.status,
        expires_at=_instant(record.expires_at_ms) if record.expires_at_ms else None,
        created_at=_instant(record.created_ms), hint=record.hint, version=record.version,
    )  # fmt: skip


Admin = Annotated[str, Depends(admin)]
"""The calling admin credential's name."""


async def _audit(request: Request, actor: str, action: str, target: str, before: object, after: object) -> None:
    trail: AuditTrail = request.app.state.audit
    await trail.record(f"admin:{actor}", action, target, _plain(before), _plain(after))


def _plain(value: object) -> object:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def _policies(request: Request) -> PolicySet:
    policies: PolicySet = request.app.state.policies
    return policies


def _known_plan(request: Request, plan: str | None) -> str:
    try:
        return _policies(request).known_plan(plan)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


def _future(moment: datetime | None) -> int:
    if moment is None:
        return 0
    at = _ms(moment)
    if at <= wall_clock_ms():
        raise HTTPException(status_code=422, detail="expires_at must be in the future")
    return at


async def _store_key(request: Request, record: KeyRecord, expected_version: int) -> KeyRecord:
    try:
        return await _registry(request).put_key(record, expected_version=expected_version)
    except KafkaError as exc:
        raise _registry_unavailable(exc) from None
    except KeyConflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except KeyRevoked:
        raise _revoked() from None
    except RegistryLag as exc:
        raise _lagging(exc) from None


def _lagging(exc: RegistryLag) -> HTTPException:
    return HTTPException(status_code=503, detail=f"{exc}: read the key again before retrying")


def _revoked() -> HTTPException:
    return HTTPException(status_code=409, detail="a revoked key cannot be changed; create a new key")


def _if_match(header: str | None, held: int, what: str = "key") -> int:
    """The version a change is made on top of: the If-Match header's, else the one held here."""
    if header is None or header.strip() == "*":
        return held
    try:
        return int(header.strip().removeprefix("W/").strip('"'))
    except ValueError:
        raise HTTPException(status_code=400, detail=f"If-Match must be a {what} version, as in the `version` read") from None


def _registry_unavailable(exc: KafkaError) -> HTTPException:
    return HTTPException(status_code=503, detail=f"the registry (Kafka) did not take the change: {type(exc).__name__}")


def _existing(request: Request, key_id: str) -> KeyRecord:
    record = _registry(request).keys.get(key_id)
    if record is None:
        raise HTTPException(status_code=404, detail=f"no key {key_id}")
    return record


@router.post("/keys", status_code=201, response_model=NewKey, summary="Create an API key (shown once)")
async def create_key(request: Request, body: KeyCreate, actor: Admin) -> NewKey:
    salt = request.app.state.settings.key_salt_bytes
    plan, expires_at_ms = _known_plan(request, body.plan), _future(body.expires_at)
    try:
        plain, record = await issue_key(
            _registry(request), salt, tenant=body.tenant, plan=plan, name=body.name, expires_at_ms=expires_at_ms
        )
    except KafkaError as exc:
        raise _registry_unavailable(exc) from None
    except RegistryLag as exc:  # written, perhaps: nobody holds the plain key, so it is harmless
        raise _lagging(exc) from None
    await _audit(request, actor, "key.create", record.key_id, None, key_info(record))
    return NewKey(**key_info(record).model_dump(), key=plain)


@router.get("/keys", response_model=KeyPage, summary="List API keys, filtered, a page at a time")
async def list_keys(
    request: Request,
    tenant: str | None = None,
    plan: str | None = None,
    status: Literal["active", "suspended", "revoked"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: str | None = Query(None, description="the `next_cursor` of the previous page"),
) -> KeyPage:
    records = sorted(_registry(request).keys.values(), key=lambda record: record.key_id)
    chosen = [
        record for record in records
        if (cursor is None or record.key_id > cursor) and (tenant is None or record.tenant == tenant)
        and (plan is None or (record.plan or None) == plan) and (status is None or record.status == status)
    ]  # fmt: skip
    page = chosen[:limit]
    return KeyPage(keys=[key_info(r) for r in page], next_cursor=page[-1].key_id if len(chosen) > limit else None)


@router.get("/keys/{key_id}", response_model=KeyInfo, summary="One API key")
async def get_key(request: Request, key_id: _KeyId) -> KeyInfo:
    return key_info(_existing(request, key_id))


@router.patch(
    "/keys/{key_id}", response_model=KeyInfo, summary="Change a key's plan, status, name or expiry",
    description="Made only on top of the version read (If-Match: the key's `version`, else the one this process "
    "holds): 409 if another change landed first, or if the key is revoked.",
)  # fmt: skip
async def change_key(
    request: Request, key_id: _KeyId, body: KeyChange, actor: Admin, if_match: Annotated[str | None, Header()] = None
) -> KeyInfo:
    record = before = _existing(request, key_id)
    if record.status == "revoked":
        raise _revoked()
    expected = _if_match(if_match, record.version)
    changes = body.model_dump(exclude_unset=True)
    if "plan" in changes:
        record = msgspec.structs.replace(record, plan=_known_plan(request, body.plan))
    if body.status is not None:
        record = msgspec.structs.replace(record, status=body.status)
    if body.name is not None:
        record = msgspec.structs.replace(record, name=body.name)
    if "expires_at" in changes:
        record = msgspec.structs.replace(record, expires_at_ms=_future(body.expires_at))
    after = await _store_key(request, record, expected)
    await _audit(request, actor, "key.change", key_id, key_info(before), key_info(after))
    return key_info(after)


@router.delete("/keys/{key_id}", response_model=KeyInfo, summary="Revoke a key, for good (no later change undoes it)")
async def revoke_key(request: Request, key_id: _KeyId, actor: Admin) -> KeyInfo:
    before = _existing(request, key_id)
    try:
        after = await _registry(request).revoke_key(key_id)
    except KafkaError as exc:
        raise _registry_unavailable(exc) from None
    except RegistryLag as exc:
        raise _lagging(exc) from None
    if before.status != "revoked":
        await _audit(request, actor, "key.revoke", key_id, key_info(before), key_info(after))
    return key_info(after)


def _validated(document: dict[str, object]) -> PolicySet:
    """A whole policy document, validated as the policy file is."""
    try:
        return parse_policies(_encodable(json.dumps(document, ensure_ascii=False)), "request body")
    except ValueError as exc:  # PolicyFileError included
        raise HTTPException(status_code=422, detail=str(exc)) from None


async def _put_document(request: Request, policies: PolicySet, expected_version: int) -> int:
    """Store a validated policy document on top of ``expected_version`` and apply it here; its version."""
    try:
        version = await _registry(request).put_policies(policies, expected_version=expected_version)
    except KafkaError as exc:
        raise _registry_unavailable(exc) from None
    except PoliciesConflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except RegistryLag as exc:
        raise HTTPException(status_code=503, detail=f"{exc}: read the plans and policies again before retrying") from None
    if _registry(request).policies_version == version:  # (the follower may have applied a later one already)
        source: PolicySource = request.app.state.policy_source
        await source.registry_changed(policies)
    return version


def _document(request: Request) -> PolicySet:
    """The plans and policies of `Registry.policies_version`: the registry's document once there is one (the
    handlers that apply it elsewhere in this process may not have run yet), else the policy file's."""
    return _registry(request).policies or _policies(request)


async def _document_at(request: Request, expected: int) -> PolicySet:
    """The document a change made on top of ``expected`` is merged into: when another process wrote that version
    and this one has not read it yet, it reads the registry to its end first (else the change would carry the
    older document's other half, and undo what that version changed)."""
    registry = _registry(request)
    if expected > registry.policies_version:
        try:
            await registry.catch_up()
        except RegistryLag as exc:
            raise HTTPException(status_code=503, detail=f"{exc}: retry") from None
    return _document(request)


def _tagged(response: Response, version: int) -> int:
    response.headers["ETag"] = f'"{version}"'
    return version


@router.get("/plans", response_model=PlansInForce, summary="The plans in force (ETag: their version)")
async def get_plans(request: Request, response: Response) -> PlansInForce:
    policies = _document(request)
    version = _tagged(response, _registry(request).policies_version)
    return PlansInForce(plans=policies.plans, default_plan=policies.default_plan, version=version)


@router.put(
    "/plans", response_model=PlansChanged, summary="Replace the plans (validated with the policies in force)",
    description="Made only on top of the version read (If-Match: the `version` of GET /plans or /policies, else the one "
    "this process holds): 409 if another change landed first. A plan that keys still use is removed only with "
    "`move_keys_to`, a plan of the new document that those keys then move to; without it, 409 names the plan.",
)  # fmt: skip
async def put_plans(
    request: Request, response: Response, body: Plans, actor: Admin, if_match: Annotated[str | None, Header()] = None,
    move_keys_to: Annotated[str | None, Query(description="the plan the keys of removed plans move to")] = None,
) -> PlansChanged:  # fmt: skip
    expected = _if_match(if_match, _document_version(request, body.version), "plans and policies")
    current = await _document_at(request, expected)
    policies = _validated({**current.model_dump(mode="json"), **body.model_dump(mode="json", exclude={"version"})})
    stranded = _keys_of_removed_plans(request, set(current.plans) - set(policies.plans))
    if stranded and move_keys_to is None:
        plans = ", ".join(sorted({record.plan for record in stranded}))
        raise HTTPException(status_code=409, detail=f"{len(stranded)} keys still use plan(s) {plans}: pass "
                            "move_keys_to=<plan> to move them to a plan of the new document, or move them first")  # fmt: skip
    if stranded and move_keys_to not in policies.plans:
        raise HTTPException(status_code=422, detail=f"move_keys_to: {move_keys_to!r} is not a plan of the new document")
    version = _tagged(response, await _put_document(request, policies, expected))
    after = PlansChanged(plans=policies.plans, default_plan=policies.default_plan, version=version)
    await _audit(request, actor, "plans.replace", "plans", Plans(plans=current.plans, default_plan=current.default_plan), after)
    for record in stranded:  # each key moves on top of the version read, like PATCH /keys/{key_id}
        try:
            moved = await _store_key(request, msgspec.structs.replace(record, plan=move_keys_to or ""), record.version)
        except HTTPException:  # changed or revoked meanwhile, or Kafka away: the plans stand; say which key stayed
            after.keys_not_moved.append(record.key_id)
            continue
        await _audit(request, actor, "key.change", record.key_id, key_info(record), key_info(moved))
    return after


def _document_version(request: Request, read: int | None) -> int:
    """The version a change of plans or policies is made on top of, when no If-Match says: the body's, else the
    one held here."""
    return _registry(request).policies_version if read is None else read


def _keys_of_removed_plans(request: Request, removed: set[str]) -> list[KeyRecord]:
    if not removed:
        return []
    return [record for record in _registry(request).keys.values() if record.plan in removed and record.status != "revoked"]


@router.get("/policies", response_model=PoliciesInForce, summary="The policies in force (ETag: their version)")
async def get_policies(request: Request, response: Response) -> PoliciesInForce:
    source: PolicySource = request.app.state.policy_source
    version = _tagged(response, _registry(request).policies_version)
    return PoliciesInForce(policies=_document(request).policies, origin=source.origin, version=version)


@router.put(
    "/policies", response_model=PoliciesInForce, summary="Replace the policies (applied everywhere within seconds)",
    description="Made only on top of the version read (If-Match, as for PUT /plans): 409 if another change landed first.",
)  # fmt: skip
async def put_policies(
    request: Request, response: Response, body: Policies, actor: Admin, if_match: Annotated[str | None, Header()] = None
) -> PoliciesInForce:
    expected = _if_match(if_match, _document_version(request, body.version), "plans and policies")
    current = await _document_at(request, expected)
    policies = _validated({**current.model_dump(mode="json"), "policies": [p.model_dump(mode="json") for p in body.policies]})
    version = _tagged(response, await _put_document(request, policies, expected))
    await _audit(request, actor, "policies.replace", "policies", Policies(policies=current.policies), Policies(policies=policies.policies))
    return PoliciesInForce(policies=policies.policies, origin="registry", version=version)


class AuditEntry(BaseModel):
    id: str
    at: datetime
    actor: str = Field(description="admin:<credential name>, or cli:<user> for `throttlex keys create`")
    action: Literal["key.create", "key.change", "key.revoke", "plans.replace", "policies.replace"]
    target: str = Field(description="the key id, or plans / policies")
    before: Any = Field(description="the key, plans or policies before the change (null for a creation)")
    after: Any


class AuditPage(BaseModel):
    entries: list[AuditEntry] = Field(description="newest first")


@router.get("/audit", response_model=AuditPage, summary="The audit trail of admin changes, newest first")
async def audit_trail(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    target: Annotated[str | None, Query(max_length=128, description="a key id, plans or policies")] = None,
    actor: Annotated[str | None, Query(max_length=128, description="e.g. admin:root")] = None,
) -> AuditPage:
    trail: AuditTrail = request.app.state.audit
    try:
        entries = await trail.recent(limit, target=target, actor=actor)
    except KafkaError as exc:
        raise HTTPException(status_code=503, detail=f"the audit trail (Kafka) cannot be read now: {type(exc).__name__}") from None
    return AuditPage(entries=[_entry(entry) for entry in entries])


def _entry(entry: AuditRecord) -> AuditEntry:
    return AuditEntry(id=entry.id, at=_instant(entry.at_ms), actor=entry.actor, action=entry.action,
                      target=entry.target, before=entry.before, after=entry.after)  # fmt: skip


@router.get("/policies/{name}/dry-run", response_model=DryRun, summary="Replay a policy in force over stored usage")
async def dry_run(
    request: Request,
    name: str,
    start: Annotated[Instant, Query(alias="from", description="start, inclusive (ISO 8601; UTC if no offset)")],
    end: Annotated[Instant, Query(alias="to", description="end, exclusive")],
) -> DryRun:
    policy = _policies(request).by_name(name)
    if policy is None:
        raise HTTPException(status_code=404, detail=f"no policy {name!r}; POST /v1/admin/policies/dry-run tries one not in force")
    return await _dry_run(request, policy, start, end)


@router.post("/policies/dry-run", response_model=DryRun, summary="Replay a proposed policy over stored usage")
async def dry_run_proposal(request: Request, body: DryRunRequest) -> DryRun:
    return await _dry_run(request, body.policy, body.start, body.end)


async def _dry_run(request: Request, policy: Policy, start: datetime, end: datetime) -> DryRun:
    if end <= start:
        raise HTTPException(status_code=422, detail="`to` must be after `from`")
    store: UsageStore | None = request.app.state.store
    if store is None:
        raise HTTPException(status_code=503, detail="a dry-run reads ClickHouse: run the API with the sink or a ClickHouse server")
    most = request.app.state.settings.dry_run_max_events
    try:
        result = await store_answer(replay_stored(store, policy, _policies(request), start, end, most=most), "stored usage")
    except TooManyEvents as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    keys = [
        KeyBacktest(
            limit_key=entry.limit_key,
            blocked_s=sum(until - begin for begin, until in entry.intervals) / 1000,
            blocks=[BlockInterval(start=_instant(b), until=_instant(u), seconds=(u - b) / 1000) for b, u in entry.intervals],
        )
        for entry in result.keys.values()
    ]
    keys.sort(key=lambda k: (-k.blocked_s, k.limit_key))
    return DryRun(policy=policy.name, start=start, end=end, events_replayed=result.events, keys=keys)
