/**
 * What the admin API may change in the inventory, as pure functions over the whole fleet: each
 * takes the fleet as it is and a checked body, and answers the fleet as it will be (or throws a
 * GatewayError: 400 naming the field, 404 for an unknown id, 409 for a conflict). The database
 * and the file store (services/fleet/fleet-store.ts) apply the difference; the rules are the same for
 * both. No Fastify here.
 */
import { GatewayError } from '../http/errors.js'
import { normaliseAddress, WILDCARD, type ModelKind } from './inventory.js'
import type {
  AssignmentCreate, AssignmentPatch, AssignmentRecord, ComputerRecord, GpuRecord, ModelRecord
} from './inventory-schema.js'
import { modelKey } from './model-name.js'
import { aliasProblem, fallbacksProblem, type AliasProblem, type ModelAlias, type ModelFallbacks } from './model-aliases.js'

export interface Fleet {
  computers: ComputerRecord[]
  gpus: GpuRecord[]
  models: ModelRecord[]
  assignments: AssignmentRecord[]
  /** Model aliases (CONTRACT 17); absent: none. */
  aliases?: ModelAlias[]
  /** Each model's fallbacks, in order; absent: none. */
  fallbacks?: ModelFallbacks[]
}

export type RecordId = string | number

export interface RuleContext {
  /** Leases held for this assignment right now (requests in flight and reservations). */
  inFlight: (assignment: AssignmentRecord) => Promise<number>
  /**
   * MariaDB: every model an assignment serves must be listed in a model table, `'*'` included.
   * A file lists named models only; an assignment of an unlisted model or `'*'` names its kind.
   */
  modelsInTables: boolean
}

const same = (a: RecordId, b: RecordId): boolean => String(a) === String(b)
/** Names compare as the original tables' collation does: case-insensitively. */
const sameName = (a: string, b: string): boolean => a.toLowerCase() === b.toLowerCase()

export const cloneFleet = (f: Fleet): Fleet => JSON.parse(JSON.stringify(f)) as Fleet

/** The next free integer id (string ids, which only a file can hold, are skipped). */
function nextId (records: Array<{ id: RecordId }>): number {
  let max = 0
  for (const r of records) {
    const n = typeof r.id === 'number' ? r.id : /^\d+$/.test(r.id) ? Number(r.id) : 0
    if (n > max) max = n
  }
  return max + 1
}

function find<T extends { id: RecordId }> (records: T[], id: RecordId, what: string): T {
  const found = records.find((r) => same(r.id, id))
  if (found === undefined) throw new GatewayError(404, `no ${what} ${id}`)
  return found
}

const bad = (field: string, message: string): GatewayError => new GatewayError(400, `${field}: ${message}`)
const conflict = (message: string): GatewayError => new GatewayError(409, message)

/* ------------------------------------------------------------------------------------------ */

export function getComputer (fleet: Fleet, id: RecordId): ComputerRecord {
  return find(fleet.computers, id, 'computer')
}

function checkComputer (fleet: Fleet, c: ComputerRecord): void {
  if (normaliseAddress(c.ip) === undefined) throw bad('ip', `must be an IPv4 or IPv6 address or a host name (got ${JSON.stringify(c.ip)})`)
  const twin = fleet.computers.find((o) => !same(o.id, c.id) && sameName(o.name, c.name))
  if (twin !== undefined) throw conflict(`computer ${twin.id} is already named ${JSON.stringify(twin.name)}`)
}

export function createComputer (fleet: Fleet, body: { name: string, ip: string }): ComputerRecord {
  const record: ComputerRecord = { id: nextId(fleet.computers), name: body.name, ip: body.ip.trim() }
  checkComputer(fleet, record)
  fleet.computers.push(record)
  return record
}

export function updateComputer (fleet: Fleet, id: RecordId, patch: Partial<{ name: string, ip: string }>): ComputerRecord {
  const record = getComputer(fleet, id)
  const next = { ...record, ...patch, ip: (patch.ip ?? record.ip).trim() }
  checkComputer(fleet, next)
  Object.assign(record, next)
  return record
}

export function deleteComputer (fleet: Fleet, id: RecordId): void {
  const record = getComputer(fleet, id)
  const gpus = fleet.gpus.filter((g) => same(g.computerId, record.id))
  if (gpus.length > 0) throw conflict(`computer ${record.id} still has GPUs ${gpus.map((g) => g.id).join(', ')}: delete or move them first`)
  fleet.computers = fleet.computers.filter((c) => c !== record)
}

/* ------------------------------------------------------------------------------------------ */

export function getGpu (fleet: Fleet, id: RecordId): GpuRecord {
  return find(fleet.gpus, id, 'gpu')
}

const assignmentsOfGpu = (fleet: Fleet, gpuId: RecordId): AssignmentRecord[] =>
  fleet.assignments.filter((a) => a.gpuIds.some((g) => same(g, gpuId)))

function checkGpu (fleet: Fleet, g: GpuRecord): void {
  const computer = fleet.computers.find((c) => same(c.id, g.computerId))
  if (computer === undefined) throw bad('computerId', `no computer ${g.computerId}`)
  g.computerId = computer.id
  const twin = fleet.gpus.find((o) => !same(o.id, g.id) && same(o.computerId, g.computerId) && sameName(o.name, g.name))
  if (twin !== undefined) throw conflict(`gpu ${twin.id} on computer ${computer.id} is already named ${JSON.stringify(twin.name)}`)
}

export function createGpu (fleet: Fleet, body: { name: string, vramGb: number, computerId: RecordId, weight?: number | null }): GpuRecord {
  const record: GpuRecord = { id: nextId(fleet.gpus), name: body.name, vramGb: body.vramGb, computerId: body.computerId, weight: body.weight ?? null }
  checkGpu(fleet, record)
  fleet.gpus.push(record)
  return record
}

export function updateGpu (fleet: Fleet, id: RecordId, patch: Partial<Omit<GpuRecord, 'id'>>): GpuRecord {
  const record = getGpu(fleet, id)
  const next = { ...record, ...patch }
  checkGpu(fleet, next)
  if (!same(next.computerId, record.computerId)) {
    // An assignment is one server: its GPUs stay on one computer.
    const split = assignmentsOfGpu(fleet, record.id).find((a) => a.gpuIds.length > 1)
    if (split !== undefined) throw conflict(`gpu ${record.id} is in assignment ${split.id} ${JSON.stringify(split.name)} with other GPUs: an assignment's GPUs stay on one computer`)
  }
  Object.assign(record, next)
  return record
}

export function deleteGpu (fleet: Fleet, id: RecordId): void {
  const record = getGpu(fleet, id)
  const users = assignmentsOfGpu(fleet, record.id)
  if (users.length > 0) throw conflict(`gpu ${record.id} is still in assignment ${users.map((a) => `${a.id} ${JSON.stringify(a.name)}`).join(', ')}`)
  fleet.gpus = fleet.gpus.filter((g) => g !== record)
}

/* ------------------------------------------------------------------------------------------ */

export function kindOfModel (fleet: Fleet, model: string): ModelKind | undefined {
  const key = model === WILDCARD ? WILDCARD : modelKey(model)
  return fleet.models.find((m) => (m.name === WILDCARD ? WILDCARD : modelKey(m.name)) === key)?.kind
}

export function createModel (fleet: Fleet, body: ModelRecord, ctx: Pick<RuleContext, 'modelsInTables'>): ModelRecord {
  if (body.name === WILDCARD && !ctx.modelsInTables) throw bad('name', "'*' is not a model here: give a '*' assignment its kind instead")
  const known = kindOfModel(fleet, body.name)
  if (known !== undefined) throw conflict(`model ${JSON.stringify(body.name)} is already listed (as ${known})`)
  const alias = (fleet.aliases ?? []).find((a) => modelKey(a.alias) === modelKey(body.name))
  if (alias !== undefined) throw conflict(`${JSON.stringify(body.name)} is an alias (of ${JSON.stringify(alias.model)}): delete the alias first`)
  const record: ModelRecord = body.kind === 'speech' ? { kind: body.kind, name: body.name } : { kind: body.kind, name: body.name, size: body.size ?? 0 }
  fleet.models.push(record)
  return record
}

export function deleteModel (fleet: Fleet, kind: ModelKind, name: string): void {
  const key = name === WILDCARD ? WILDCARD : modelKey(name)
  const keyOf = (m: string): string => m === WILDCARD ? WILDCARD : modelKey(m)
  const record = fleet.models.find((m) => m.kind === kind && keyOf(m.name) === key)
  if (record === undefined) throw new GatewayError(404, `no ${kind} model ${JSON.stringify(name)}`)
  const users = fleet.assignments.filter((a) => keyOf(a.model) === key)
  if (users.length > 0) throw conflict(`model ${JSON.stringify(record.name)} is still served by assignment ${users.map((a) => `${a.id} ${JSON.stringify(a.name)}`).join(', ')}`)
  const alias = (fleet.aliases ?? []).find((a) => modelKey(a.model) === key)
  if (alias !== undefined) throw conflict(`model ${JSON.stringify(record.name)} is the target of alias ${JSON.stringify(alias.alias)}: delete the alias first`)
  fleet.models = fleet.models.filter((m) => m !== record)
}

/* ------------------------------------------------------------------------------------------ */

/** A model of the fleet: listed, or served by an assignment that names it. */
const modelOfFleet = (fleet: Fleet) => (key: string): boolean =>
  fleet.models.some((m) => m.name !== WILDCARD && modelKey(m.name) === key) ||
  fleet.assignments.some((a) => a.model !== WILDCARD && modelKey(a.model) === key)

const refusalOf = (p: AliasProblem): GatewayError => p.status === 409 ? conflict(p.message) : bad(p.field, p.message)

export function getAliases (fleet: Fleet): ModelAlias[] {
  return fleet.aliases ?? []
}

/**
 * A new alias: refused when it names a model or another alias (400: an alias resolves in one
 * step), and when its own name is a model's or an alias's already (409, as any name taken).
 */
export function createAlias (fleet: Fleet, body: ModelAlias): ModelAlias {
  const aliases = fleet.aliases ?? []
  const record = { alias: body.alias, model: body.model }
  const problem = aliasProblem(record, aliases, modelOfFleet(fleet))
  if (problem !== undefined) throw refusalOf(problem)
  fleet.aliases = [...aliases, record]
  return record
}

export function deleteAlias (fleet: Fleet, alias: string): void {
  const aliases = fleet.aliases ?? []
  const record = aliases.find((a) => modelKey(a.alias) === modelKey(alias))
  if (record === undefined) throw new GatewayError(404, `no alias ${JSON.stringify(alias)}`)
  fleet.aliases = aliases.filter((a) => a !== record)
}

export function getFallbacks (fleet: Fleet, model: string): ModelFallbacks {
  const found = (fleet.fallbacks ?? []).find((f) => modelKey(f.model) === modelKey(model))
  return found ?? { model, fallbacks: [] }
}

/** Replaces a model's fallbacks (an empty list removes them). */
export function setFallbacks (fleet: Fleet, model: string, fallbacks: string[]): ModelFallbacks {
  const record = { model, fallbacks: [...fallbacks] }
  const problem = fallbacksProblem(record, fleet.aliases ?? [], modelOfFleet(fleet))
  if (problem !== undefined) throw refusalOf(problem)
  const others = (fleet.fallbacks ?? []).filter((f) => modelKey(f.model) !== modelKey(model))
  fleet.fallbacks = fallbacks.length === 0 ? others : [...others, record]
  return record
}

/* ------------------------------------------------------------------------------------------ */

export function getAssignment (fleet: Fleet, id: RecordId): AssignmentRecord {
  return find(fleet.assignments, id, 'assignment')
}

/** Checks an assignment as it will be and fills in its kind; GPU ids take the GPUs' own form. */
function checkAssignment (fleet: Fleet, a: AssignmentRecord, ctx: RuleContext): void {
  const twin = fleet.assignments.find((o) => !same(o.id, a.id) && sameName(o.name, a.name))
  if (twin !== undefined) throw conflict(`assignment ${twin.id} is already named ${JSON.stringify(twin.name)}`)
  const listed = kindOfModel(fleet, a.model)
  if (listed !== undefined) {
    if (a.kind !== undefined && a.kind !== listed) throw bad('kind', `is ${JSON.stringify(a.kind)} but model ${JSON.stringify(a.model)} is listed as ${listed}`)
    a.kind = listed
  } else if (a.model === WILDCARD && ctx.modelsInTables) {
    throw bad('model', "'*' needs '*' listed as a model of its kind first (POST /admin/models)")
  } else if (a.model !== WILDCARD && ctx.modelsInTables) {
    throw bad('model', `${JSON.stringify(a.model)} is not listed: add it first (POST /admin/models)`)
  } else if (a.kind === undefined) {
    throw bad('kind', `is required for a model that is not listed (${JSON.stringify(a.model)})`)
  }
  const gpus = a.gpuIds.map((id, i) => {
    const gpu = fleet.gpus.find((g) => same(g.id, id))
    if (gpu === undefined) throw bad(`gpuIds[${i}]`, `no gpu ${id}`)
    if (a.gpuIds.slice(0, i).some((other) => same(other, id))) throw bad(`gpuIds[${i}]`, `names gpu ${id} twice`)
    return gpu
  })
  if (gpus.some((g) => !same(g.computerId, gpus[0].computerId))) throw bad('gpuIds', 'must all be on one computer')
  a.gpuIds = gpus.map((g) => g.id)
}

export function createAssignment (fleet: Fleet, body: AssignmentCreate, ctx: RuleContext): AssignmentRecord {
  const record: AssignmentRecord = {
    id: nextId(fleet.assignments),
    name: body.name,
    model: body.model,
    ...(body.kind === undefined ? {} : { kind: body.kind }),
    port: body.port,
    gpuIds: [...body.gpuIds],
    maxParallel: body.maxParallel ?? 1,
    drained: false
  }
  checkAssignment(fleet, record, ctx)
  fleet.assignments.push(record)
  return record
}

/** Requests in flight keep the server they were given: change where it is or what it serves only once drained. */
async function assertIdle (record: AssignmentRecord, ctx: RuleContext, doing: string): Promise<void> {
  if (record.drained) return
  const n = await ctx.inFlight(record)
  if (n > 0) throw conflict(`assignment ${record.id} ${JSON.stringify(record.name)} has ${n} request${n === 1 ? '' : 's'} in flight: drain it first (POST /admin/assignments/${record.id}/drain), then ${doing}`)
}

export async function updateAssignment (fleet: Fleet, id: RecordId, patch: AssignmentPatch, ctx: RuleContext): Promise<AssignmentRecord> {
  const record = getAssignment(fleet, id)
  const next: AssignmentRecord = { ...record, ...patch, gpuIds: [...(patch.gpuIds ?? record.gpuIds)] }
  if (patch.model !== undefined && patch.kind === undefined) delete next.kind
  checkAssignment(fleet, next, ctx)
  const moved = next.model !== record.model || next.port !== record.port ||
    next.gpuIds.map(String).join(',') !== record.gpuIds.map(String).join(',')
  if (moved) await assertIdle(record, ctx, 'change it')
  Object.assign(record, next)
  return record
}

export async function deleteAssignment (fleet: Fleet, id: RecordId, ctx: RuleContext): Promise<void> {
  const record = getAssignment(fleet, id)
  await assertIdle(record, ctx, 'delete it')
  fleet.assignments = fleet.assignments.filter((a) => a !== record)
}

export function setDrained (fleet: Fleet, id: RecordId, drained: boolean): AssignmentRecord {
  const record = getAssignment(fleet, id)
  record.drained = drained
  return record
}
