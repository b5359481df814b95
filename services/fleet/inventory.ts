/**
 * The inventory: which upstream servers (assignments) serve which models on which GPUs.
 *
 * It comes either from the original ai-maestro tables in MariaDB (`loadInventoryFromDatabase`) or
 * from a JSON file in embedded mode (`loadInventoryFromFile`). Both give the same plain-data
 * `InventorySnapshot` (JSON-serialisable, so it can be cached anywhere), and `Inventory` answers
 * the questions the gateway asks of it. No Fastify here.
 */
import { readFile } from 'node:fs/promises'
import { isIP } from 'node:net'
import { checkInventoryFile, show, type InventoryFile } from './inventory-schema.js'
import { modelKey } from './model-name.js'
import { aliasProblem, fallbacksProblem, type ModelAlias, type ModelFallbacks } from './model-aliases.js'

export type ModelKind = 'llm' | 'diffusor' | 'speech'

export const MODEL_KINDS: readonly ModelKind[] = ['llm', 'diffusor', 'speech']

/** The model name an assignment uses to serve every model of its kind that no other assignment names. */
export const WILDCARD = '*'

export interface Gpu {
  id: string
  name: string
  vramSize: number
  weight: number | null
  computerId: string
  computerName: string
  /** The computer's address: IPv4, IPv6 (without brackets) or host name. */
  ip: string
}

export interface Assignment {
  id: string
  name: string
  /** The model name as stored. */
  model: string
  /** `modelKey(model)`, or `'*'` for a wildcard assignment. */
  modelKey: string
  kind: ModelKind
  ip: string
  port: number
  /** `http://ip:port`, IPv6 in brackets. */
  url: string
  /** `ip:port` (IPv6 in brackets), for the Host header. */
  host: string
  /** Sorted numerically when numeric. */
  gpuIds: string[]
  /** AVG(gpus.weight) over the assignment's GPUs, NULL counting as 0. */
  weight: number
  computerName: string
  /** Requests it runs at once (parallel slots, >= 1): `assignments.max_parallel`, a file's `"parallel"`. */
  capacity: number
  /** Drained by an operator (POST /admin/assignments/:id/drain): takes no new lease; what runs finishes. */
  drained?: boolean
}

/** NULL, missing or below 1: one request at a time, as in the original proxy. */
export function capacityFrom (v: unknown): number {
  const n = typeof v === 'number' ? v : Number(v)
  return v === null || v === undefined || !Number.isInteger(n) || n < 1 ? 1 : n
}

export interface InventorySnapshot {
  gpus: Gpu[]
  /** Only the usable assignments, sorted by id. */
  assignments: Assignment[]
  /** Every known model with its kind, each model key once. */
  models: Array<{ name: string, kind: ModelKind }>
  /** What was left out of the inventory, and why. */
  warnings: string[]
  /** Other names of models (CONTRACT 17); absent when there are none. */
  aliases?: ModelAlias[]
  /** Models that serve a model's requests when it cannot, in order; absent when there are none. */
  fallbacks?: ModelFallbacks[]
}

export type Query = (sql: string, params?: unknown[]) => Promise<any[]>

/* ------------------------------------------------------------------------------------------ */
/* Inventory                                                                                   */
/* ------------------------------------------------------------------------------------------ */

export class Inventory {
  readonly snapshot: InventorySnapshot
  readonly #byId = new Map<string, Assignment>()
  readonly #gpuById = new Map<string, Gpu>()
  /** named (non-wildcard) assignments by model key, in preference order */
  readonly #byModelKey = new Map<string, Assignment[]>()
  /** wildcard assignments by kind, in preference order */
  readonly #wildcards = new Map<ModelKind, Assignment[]>()
  /** every assignment by kind, in preference order */
  readonly #byKind = new Map<ModelKind, Assignment[]>()
  readonly #kindByKey = new Map<string, ModelKind>()
  /** candidateList() answers the same array for the same question while this inventory lasts. */
  readonly #answers = new Map<string, Assignment[]>()
  readonly #aliasByKey = new Map<string, ModelAlias>()
  readonly #fallbacksByKey = new Map<string, string[]>()

  constructor (snapshot: InventorySnapshot) {
    this.snapshot = {
      gpus: snapshot.gpus,
      assignments: snapshot.assignments,
      models: snapshot.models,
      warnings: snapshot.warnings ?? [],
      ...(snapshot.aliases === undefined ? {} : { aliases: snapshot.aliases }),
      ...(snapshot.fallbacks === undefined ? {} : { fallbacks: snapshot.fallbacks })
    }
    for (const a of snapshot.aliases ?? []) this.#aliasByKey.set(modelKey(a.alias), a)
    for (const f of snapshot.fallbacks ?? []) this.#fallbacksByKey.set(modelKey(f.model), f.fallbacks)
    for (const gpu of snapshot.gpus) this.#gpuById.set(gpu.id, gpu)
    for (const { name, kind } of snapshot.models) {
      const key = modelKey(name)
      if (!this.#kindByKey.has(key)) this.#kindByKey.set(key, kind)
    }
    for (const kind of MODEL_KINDS) {
      this.#byKind.set(kind, [])
      this.#wildcards.set(kind, [])
    }
    const preferred = [...snapshot.assignments].sort(byPreference)
    for (const a of preferred) {
      this.#byId.set(a.id, a)
      this.#byKind.get(a.kind)?.push(a)
      if (a.modelKey === WILDCARD) {
        this.#wildcards.get(a.kind)?.push(a)
      } else {
        const list = this.#byModelKey.get(a.modelKey)
        if (list === undefined) this.#byModelKey.set(a.modelKey, [a])
        else list.push(a)
      }
    }
  }

  /**
   * The assignments that serve `model` as a model of `kind`, best first: highest weight, then
   * lowest id. A model no assignment names is served by the wildcard assignments of its kind
   * (unless the model is known to be of another kind). Drained assignments are left out unless
   * `drained` is set.
   */
  candidates (model: string, kind: ModelKind, opts: { drained?: boolean } = {}): Assignment[] {
    return [...this.candidateList(model, kind, opts)]
  }

  /**
   * `candidates()` without the copy: the same array for the same question while this inventory
   * lasts (the lease stores recognise a candidate list by its array). Never modify it.
   */
  candidateList (model: string, kind: ModelKind, opts: { drained?: boolean } = {}): readonly Assignment[] {
    if (typeof model !== 'string' || model === '') return []
    const key = modelKey(model)
    const drained = opts.drained === true
    const asked = `${kind}\n${drained ? 'd' : ''}\n${key}`
    let answer = this.#answers.get(asked)
    if (answer === undefined) {
      answer = this.#candidates(key, kind, drained)
      // the names come from clients: bounded
      if (this.#answers.size >= 1000) this.#answers.clear()
      this.#answers.set(asked, answer)
    }
    return answer
  }

  #candidates (key: string, kind: ModelKind, drained: boolean): Assignment[] {
    if (key === WILDCARD) return []
    // drained ones only when asked for (to tell "all drained" from "not found")
    const usable = (a: Assignment): boolean => drained || a.drained !== true
    const named = this.#byModelKey.get(key)
    if (named !== undefined) return named.filter(a => a.kind === kind && usable(a))
    const known = this.#kindByKey.get(key)
    if (known !== undefined && known !== kind) return []
    return (this.#wildcards.get(kind) ?? []).filter(usable)
  }

  /** The kind of a model listed in the inventory (llms, diffusors, speech_models), if any. */
  kindOf (model: string): ModelKind | undefined {
    if (typeof model !== 'string') return undefined
    return this.#kindByKey.get(modelKey(model))
  }

  /** Every model of `kind` that at least one (non-wildcard) assignment serves, as stored. */
  modelNames (kind: ModelKind): string[] {
    const names = new Map<string, string>()
    for (const m of this.snapshot.models) {
      if (m.kind !== kind) continue
      const key = modelKey(m.name)
      if (names.has(key)) continue
      if (this.#byModelKey.get(key)?.some(a => a.kind === kind) === true) names.set(key, m.name)
    }
    for (const a of this.snapshot.assignments) {
      if (a.kind === kind && a.modelKey !== WILDCARD && !names.has(a.modelKey)) names.set(a.modelKey, a.model)
    }
    return [...names.values()]
  }

  assignment (id: string): Assignment | undefined {
    return this.#byId.get(String(id))
  }

  /** The model an alias names (as stored), or undefined when `name` is no alias. */
  aliasTarget (name: string): string | undefined {
    if (typeof name !== 'string' || this.#aliasByKey.size === 0) return undefined
    return this.#aliasByKey.get(modelKey(name))?.model
  }

  /** Every alias, as stored. */
  aliases (): readonly ModelAlias[] {
    return this.snapshot.aliases ?? []
  }

  /** The models that serve `name`'s requests when it cannot, in order, aliases among them resolved. */
  fallbacksOf (name: string): string[] {
    if (typeof name !== 'string' || this.#fallbacksByKey.size === 0) return []
    return (this.#fallbacksByKey.get(modelKey(name)) ?? []).map((f) => this.aliasTarget(f) ?? f)
  }

  /** Every assignment of `kind`, wildcards included, in preference order. */
  assignmentsOfKind (kind: ModelKind): Assignment[] {
    return [...(this.#byKind.get(kind) ?? [])]
  }

  gpu (id: string): Gpu | undefined {
    return this.#gpuById.get(String(id))
  }
}

/** Numeric ids in numeric order, before any non-numeric ones (which sort as strings). */
export function compareIds (a: string, b: string): number {
  const an = /^\d+$/.test(a)
  const bn = /^\d+$/.test(b)
  if (an && bn) {
    const x = BigInt(a)
    const y = BigInt(b)
    return x < y ? -1 : x > y ? 1 : 0
  }
  if (an !== bn) return an ? -1 : 1
  return a < b ? -1 : a > b ? 1 : 0
}

function byPreference (a: Assignment, b: Assignment): number {
  if (a.weight !== b.weight) return b.weight - a.weight
  return compareIds(a.id, b.id)
}

/* ------------------------------------------------------------------------------------------ */
/* Building a snapshot from the facts (shared by the database and the file)                   */
/* ------------------------------------------------------------------------------------------ */

interface Facts {
  computers: Array<{ id: string, name: string, ip: string }>
  gpus: Array<{ id: string, name: string, vramSize: number, weight: number | null, computerId: string }>
  /** in listing order; a model listed twice keeps its first kind */
  models: Array<{ name: string, kind: ModelKind }>
  assignments: Array<{ id: string, name: string, model: string, port: number, gpuIds: string[], kind?: ModelKind, capacity?: number, drained?: boolean }>
  aliases?: ModelAlias[]
  fallbacks?: ModelFallbacks[]
}

const TABLE_OF_KIND: Record<ModelKind, string> = { llm: 'llms', diffusor: 'diffusors', speech: 'speech_models' }

/**
 * An address usable in a URL: IPv4, IPv6 (returned without brackets) or a host name.
 * Undefined when it is none of these (so nothing odd ever ends up in an upstream URL).
 */
export function normaliseAddress (raw: string): string | undefined {
  let s = raw.trim()
  if (s.startsWith('[') && s.endsWith(']')) s = s.slice(1, -1)
  if (s === '') return undefined
  if (s.includes(':')) return isIP(s) === 6 ? s.toLowerCase() : undefined
  if (s.length > 253) return undefined
  return /^[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$/.test(s) ? s : undefined
}

function hostPort (ip: string, port: number): string {
  return ip.includes(':') ? `[${ip}]:${port}` : `${ip}:${port}`
}

function describe (a: { id: string, name: string }): string {
  return `assignment ${a.id} ${JSON.stringify(a.name)}`
}

function buildSnapshot (facts: Facts): InventorySnapshot {
  const warnings: string[] = []

  const computers = new Map<string, { name: string, ip: string | undefined, rawIp: string }>()
  for (const c of facts.computers) {
    const ip = normaliseAddress(c.ip)
    if (ip === undefined) warnings.push(`computer ${c.id} ${JSON.stringify(c.name)} has an unusable address ${JSON.stringify(c.ip)}: its assignments are left out`)
    computers.set(c.id, { name: c.name, ip, rawIp: c.ip })
  }

  const gpus: Gpu[] = []
  const gpuById = new Map<string, Gpu>()
  for (const g of facts.gpus) {
    const computer = computers.get(g.computerId)
    if (computer === undefined) {
      warnings.push(`gpu ${g.id} ${JSON.stringify(g.name)} is on unknown computer ${g.computerId}: left out`)
      continue
    }
    const gpu: Gpu = {
      id: g.id,
      name: g.name,
      vramSize: g.vramSize,
      weight: g.weight,
      computerId: g.computerId,
      computerName: computer.name,
      ip: computer.ip ?? computer.rawIp
    }
    gpus.push(gpu)
    gpuById.set(gpu.id, gpu)
  }
  gpus.sort((a, b) => compareIds(a.id, b.id))

  const models: InventorySnapshot['models'] = []
  const kindByKey = new Map<string, { kind: ModelKind, name: string }>()
  for (const m of facts.models) {
    const key = modelKey(m.name)
    const seen = kindByKey.get(key)
    if (seen === undefined) {
      kindByKey.set(key, { kind: m.kind, name: m.name })
      models.push({ name: m.name, kind: m.kind })
    } else if (seen.kind !== m.kind) {
      warnings.push(`model ${JSON.stringify(m.name)} is listed in ${TABLE_OF_KIND[m.kind]} and also as ${JSON.stringify(seen.name)} in ${TABLE_OF_KIND[seen.kind]}: treated as ${seen.kind}`)
    }
  }

  const assignments: Assignment[] = []
  for (const raw of facts.assignments) {
    const wildcard = raw.model === WILDCARD
    const key = wildcard ? WILDCARD : modelKey(raw.model)
    const kind = raw.kind ?? kindByKey.get(key)?.kind
    if (kind === undefined) {
      warnings.push(wildcard
        ? `${describe(raw)} serves '*' but its kind is unknown (list '*' in llms, diffusors or speech_models): left out`
        : `${describe(raw)} serves model ${JSON.stringify(raw.model)}, which is in none of llms, diffusors, speech_models: left out`)
      continue
    }
    if (!Number.isInteger(raw.port) || raw.port < 1 || raw.port > 65535) {
      warnings.push(`${describe(raw)} has port ${raw.port}, not 1..65535: left out`)
      continue
    }
    const gpuIds = [...new Set(raw.gpuIds)].sort(compareIds)
    const own: Gpu[] = []
    for (const id of gpuIds) {
      const gpu = gpuById.get(id)
      if (gpu === undefined) warnings.push(`${describe(raw)} names unknown gpu ${id}: ignored`)
      else own.push(gpu)
    }
    if (own.length === 0) {
      warnings.push(`${describe(raw)} has no GPUs: left out`)
      continue
    }
    const first = own[0]
    const computer = computers.get(first.computerId)
    if (computer?.ip === undefined) {
      warnings.push(`${describe(raw)} is on computer ${first.computerId} whose address ${JSON.stringify(first.ip)} is unusable: left out`)
      continue
    }
    if (own.some(g => g.computerId !== first.computerId)) {
      warnings.push(`${describe(raw)} has GPUs on several computers: reached at ${computer.name} (${computer.ip}), the computer of gpu ${first.id}`)
    }
    const weight = own.reduce((sum, g) => sum + (g.weight ?? 0), 0) / own.length
    const host = hostPort(computer.ip, raw.port)
    assignments.push({
      id: raw.id,
      name: raw.name,
      model: raw.model,
      modelKey: key,
      kind,
      ip: computer.ip,
      port: raw.port,
      url: `http://${host}`,
      host,
      gpuIds: own.map(g => g.id),
      weight,
      computerName: computer.name,
      capacity: capacityFrom(raw.capacity),
      ...(raw.drained === true ? { drained: true } : {})
    })
  }
  assignments.sort((a, b) => compareIds(a.id, b.id))

  // Aliases and fallbacks of the models as they are now: one that no longer holds (its model was
  // removed by hand) is left out, with a warning, rather than sending requests astray.
  const isModel = (key: string): boolean => kindByKey.has(key) || assignments.some((a) => a.modelKey === key)
  const aliases: ModelAlias[] = []
  for (const a of facts.aliases ?? []) {
    const problem = aliasProblem(a, aliases, isModel)
    if (problem === undefined) aliases.push(a)
    else warnings.push(`alias ${JSON.stringify(a.alias)}: ${problem.message}: left out`)
  }
  const fallbacks: ModelFallbacks[] = []
  for (const f of facts.fallbacks ?? []) {
    const problem = fallbacksProblem(f, aliases, isModel)
    if (problem === undefined) fallbacks.push(f)
    else warnings.push(`fallbacks of ${JSON.stringify(f.model)}: ${problem.field} ${problem.message}: left out`)
  }

  return {
    gpus,
    assignments,
    models,
    warnings,
    ...(aliases.length > 0 ? { aliases } : {}),
    ...(fallbacks.length > 0 ? { fallbacks } : {})
  }
}

/* ------------------------------------------------------------------------------------------ */
/* From MariaDB (the original ai-maestro tables)                                               */
/* ------------------------------------------------------------------------------------------ */

// Fixed statements only: nothing from a request ever becomes part of SQL.
const SQL_COMPUTERS = 'SELECT c.id, c.name, c.ip_addr FROM computers c ORDER BY c.id'
const SQL_GPUS = 'SELECT g.id, g.name, g.vram_size, g.weight, g.computer_id FROM gpus g ORDER BY g.id'
const SQL_MODELS =
  "SELECT 'llm' AS kind, l.name FROM llms l " +
  "UNION ALL SELECT 'diffusor' AS kind, d.name FROM diffusors d " +
  "UNION ALL SELECT 'speech' AS kind, s.name FROM speech_models s"
// Every column: max_parallel exists only once `npm run migrate` has run (absent = capacity 1).
const SQL_ASSIGNMENTS = 'SELECT a.* FROM assignments a ORDER BY a.id'
const SQL_ASSIGNMENT_GPUS =
  'SELECT ag.assignment_id, ag.gpu_id FROM assignment_gpus ag ' +
  'JOIN assignments a ON a.id = ag.assignment_id JOIN gpus g ON g.id = ag.gpu_id ' +
  'ORDER BY ag.assignment_id, ag.gpu_id'

/** The gateway's own table (migration 003): assignments drained by an operator. */
const SQL_DRAINED = 'SELECT d.assignment_id FROM maestro_assignment_drains d'
const ER_NO_SUCH_TABLE = 1146

/** The gateway's own tables (migration 007): model aliases and fallbacks. */
const SQL_ALIASES = 'SELECT al.alias, al.model FROM maestro_model_aliases al ORDER BY al.alias'
const SQL_FALLBACKS = 'SELECT f.model, f.position, f.fallback FROM maestro_model_fallbacks f ORDER BY f.model, f.position'

/** Rows of a table the gateway's migrations add; none on a database they have not touched. */
async function rowsIfMigrated (query: Query, sql: string): Promise<any[]> {
  try {
    return await query(sql)
  } catch (err) {
    if ((err as { errno?: number }).errno === ER_NO_SUCH_TABLE) return []
    throw err
  }
}

/** Fallback rows (model, position, fallback) as one ordered list per model. */
export function fallbacksOfRows (rows: Array<{ model: unknown, fallback: unknown }>): ModelFallbacks[] {
  const byModel = new Map<string, ModelFallbacks>()
  for (const r of rows) {
    const model = text(r.model)
    const entry = byModel.get(model)
    if (entry === undefined) byModel.set(model, { model, fallbacks: [text(r.fallback)] })
    else entry.fallbacks.push(text(r.fallback))
  }
  return [...byModel.values()]
}

/** Drained assignment ids; none on a database the gateway's migrations have not touched. */
async function drainedIds (query: Query): Promise<Set<string>> {
  try {
    return new Set((await query(SQL_DRAINED)).map(r => text(r.assignment_id)))
  } catch (err) {
    if ((err as { errno?: number }).errno === ER_NO_SUCH_TABLE) return new Set()
    throw err
  }
}

const KIND_ORDER: Record<ModelKind, number> = { llm: 0, diffusor: 1, speech: 2 }

function text (v: unknown): string {
  if (v === null || v === undefined) return ''
  if (Buffer.isBuffer(v)) return v.toString('utf8')
  return String(v)
}

function num (v: unknown): number {
  return typeof v === 'number' ? v : Number(text(v))
}

export async function loadInventoryFromDatabase (query: Query): Promise<InventorySnapshot> {
  const [computers, gpus, models, assignments, links, drained, aliasRows, fallbackRows] = await Promise.all([
    query(SQL_COMPUTERS),
    query(SQL_GPUS),
    query(SQL_MODELS),
    query(SQL_ASSIGNMENTS),
    query(SQL_ASSIGNMENT_GPUS),
    drainedIds(query),
    rowsIfMigrated(query, SQL_ALIASES),
    rowsIfMigrated(query, SQL_FALLBACKS)
  ])
  const gpusOf = new Map<string, string[]>()
  for (const row of links) {
    const id = text(row.assignment_id)
    const list = gpusOf.get(id)
    if (list === undefined) gpusOf.set(id, [text(row.gpu_id)])
    else list.push(text(row.gpu_id))
  }
  const modelRows = models.map(r => ({ name: text(r.name), kind: text(r.kind) as ModelKind }))
  // llms first, then diffusors, then speech; by name (binary order, so the result is stable) within each
  modelRows.sort((a, b) => KIND_ORDER[a.kind] - KIND_ORDER[b.kind] || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
  return buildSnapshot({
    computers: computers.map(r => ({ id: text(r.id), name: text(r.name), ip: text(r.ip_addr) })),
    gpus: gpus.map(r => ({
      id: text(r.id),
      name: text(r.name),
      vramSize: num(r.vram_size),
      weight: r.weight === null || r.weight === undefined ? null : num(r.weight),
      computerId: text(r.computer_id)
    })),
    models: modelRows,
    assignments: assignments.map(r => ({
      id: text(r.id),
      name: text(r.name),
      model: text(r.model_name),
      port: num(r.port),
      gpuIds: gpusOf.get(text(r.id)) ?? [],
      capacity: capacityFrom(r.max_parallel),
      drained: drained.has(text(r.id))
    })),
    aliases: aliasRows.map(r => ({ alias: text(r.alias), model: text(r.model) })),
    fallbacks: fallbacksOfRows(fallbackRows)
  })
}

/* ------------------------------------------------------------------------------------------ */
/* From a JSON file (embedded mode)                                                            */
/* ------------------------------------------------------------------------------------------ */

const MODEL_LISTS: Array<['llms' | 'diffusors' | 'speech', ModelKind]> = [['llms', 'llm'], ['diffusors', 'diffusor'], ['speech', 'speech']]

/**
 * Checks an embedded-mode inventory (already parsed from JSON) and turns it into a snapshot: its
 * shape by the record schemas (services/fleet/inventory-schema.ts), then what a schema cannot say (ids
 * unique, references that resolve, one computer per assignment). Throws an Error naming `source`
 * and the offending field on anything wrong.
 */
export function parseInventoryFile (json: unknown, source: string): InventorySnapshot {
  const fail = (path: string, message: string): never => {
    throw new Error(`inventory ${source}: ${path} ${message}`)
  }
  let file: InventoryFile
  try {
    file = checkInventoryFile(json)
  } catch (err) {
    throw new Error(`inventory ${source}: ${(err as Error).message}`)
  }

  /** `id` unique among `seen` (ids compare as strings: `1` and `"1"` are the same). */
  const uniqueId = (seen: Map<string, number>, list: string, i: number, raw: string | number): string => {
    const id = String(raw)
    const at = seen.get(id)
    if (at !== undefined) fail(`${list}[${i}].id`, `${id} is already the id of ${list}[${at}]`)
    seen.set(id, i)
    return id
  }

  const computers: Facts['computers'] = []
  const computerIndex = new Map<string, number>()
  file.computers.forEach((c, i) => {
    const id = uniqueId(computerIndex, 'computers', i, c.id)
    if (normaliseAddress(c.ip) === undefined) fail(`computers[${i}].ip`, `must be an IPv4 or IPv6 address or a host name (got ${show(c.ip)})`)
    computers.push({ id, name: c.name, ip: c.ip })
  })

  const gpus: Facts['gpus'] = []
  const gpuIndex = new Map<string, number>()
  file.gpus.forEach((g, i) => {
    const id = uniqueId(gpuIndex, 'gpus', i, g.id)
    const computerId = String(g.computer)
    if (!computerIndex.has(computerId)) fail(`gpus[${i}].computer`, `names computer ${computerId}, which is not in computers`)
    gpus.push({ id, name: g.name ?? `GPU ${id}`, vramSize: g.vram ?? 0, weight: g.weight ?? null, computerId })
  })

  const models: Facts['models'] = []
  const listed = new Map<string, { kind: ModelKind, path: string }>()
  for (const [list, kind] of MODEL_LISTS) {
    (file.models?.[list] ?? []).forEach((name, i) => {
      const path = `models.${list}[${i}]`
      if (name === WILDCARD) fail(path, "must name a model ('*' belongs in an assignment, with a kind)")
      const key = modelKey(name)
      const seen = listed.get(key)
      if (seen !== undefined) fail(path, `${JSON.stringify(name)} is already listed as ${seen.path}`)
      listed.set(key, { kind, path })
      models.push({ name, kind })
    })
  }

  const assignments: Facts['assignments'] = []
  const assignmentIndex = new Map<string, number>()
  const assignmentNames = new Map<string, number>()
  file.assignments.forEach((a, i) => {
    const path = `assignments[${i}]`
    const id = uniqueId(assignmentIndex, 'assignments', i, a.id)
    const sameName = assignmentNames.get(a.name)
    if (sameName !== undefined) fail(`${path}.name`, `${JSON.stringify(a.name)} is already the name of assignments[${sameName}]`)
    assignmentNames.set(a.name, i)
    let kind: ModelKind
    if (a.model === WILDCARD) {
      kind = a.kind ?? fail(`${path}.kind`, "is required when the model is '*' (one of \"llm\", \"diffusor\", \"speech\")")
    } else {
      const key = modelKey(a.model)
      const known = listed.get(key)
      if (known !== undefined) {
        if (a.kind !== undefined && a.kind !== known.kind) {
          fail(`${path}.kind`, `is ${JSON.stringify(a.kind)} but model ${JSON.stringify(a.model)} is ${known.kind} (${known.path})`)
        }
        kind = known.kind
      } else {
        kind = a.kind ?? fail(`${path}.model`, `${JSON.stringify(a.model)} is in none of models.llms, models.diffusors, models.speech: list it there or give the assignment a kind`)
        listed.set(key, { kind, path: `${path}.kind` })
        models.push({ name: a.model, kind })
      }
    }
    const gpuIds: string[] = []
    let computerId: string | undefined
    a.gpus.forEach((raw, j) => {
      const gpuId = String(raw)
      const at = gpuIndex.get(gpuId)
      if (at === undefined) fail(`${path}.gpus[${j}]`, `names gpu ${gpuId}, which is not in gpus`)
      if (gpuIds.includes(gpuId)) fail(`${path}.gpus[${j}]`, `names gpu ${gpuId} twice`)
      const on = gpus[at as number].computerId
      if (computerId !== undefined && on !== computerId) {
        fail(`${path}.gpus`, `must all be on one computer (gpu ${gpuIds[0]} is on computer ${computerId}, gpu ${gpuId} on computer ${on})`)
      }
      computerId = on
      gpuIds.push(gpuId)
    })
    assignments.push({ id, name: a.name, model: a.model, port: a.port, gpuIds, kind, capacity: a.parallel, drained: a.drained === true })
  })

  // Aliases and fallbacks must hold in a file (it is the operator's to fix), not just be left out.
  const isModel = (key: string): boolean => listed.has(key)
  const aliases: ModelAlias[] = []
  for (const [alias, model] of Object.entries(file.aliases ?? {})) {
    const problem = aliasProblem({ alias, model }, aliases, isModel)
    if (problem !== undefined) fail(`aliases[${JSON.stringify(alias)}]`, problem.message)
    aliases.push({ alias, model })
  }
  const fallbacks: ModelFallbacks[] = []
  for (const [model, list] of Object.entries(file.fallbacks ?? {})) {
    const problem = fallbacksProblem({ model, fallbacks: list }, aliases, isModel)
    if (problem !== undefined) fail(`fallbacks[${JSON.stringify(model)}]`, `${problem.field === 'model' ? '' : problem.field.slice('fallbacks'.length) + ' '}${problem.message}`)
    fallbacks.push({ model, fallbacks: list })
  }

  return buildSnapshot({ computers, gpus, models, assignments, aliases, fallbacks })
}

export async function loadInventoryFromFile (path: string): Promise<InventorySnapshot> {
  let content: string
  try {
    content = await readFile(path, 'utf8')
  } catch (err) {
    throw new Error(`inventory ${path}: cannot be read (${(err as Error).message})`)
  }
  let json: unknown
  try {
    json = JSON.parse(content)
  } catch (err) {
    throw new Error(`inventory ${path}: not valid JSON (${(err as Error).message})`)
  }
  return parseInventoryFile(json, path)
}
