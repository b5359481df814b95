/**
 * Where the admin API's changes go: the original tables in MariaDB (plus the gateway's own), each
 * change in one transaction; or, in embedded mode, the inventory file, replaced atomically (a temp
 * file in the same directory, then a rename: a reader sees the old file or the new, never half).
 * A change is a function from the fleet as it is to the fleet as it will be (services/fleet/fleet-rules.ts);
 * the store reads, applies, and writes the difference. No Fastify here.
 */
import { randomBytes } from 'node:crypto'
import { open, readFile, rename, rm } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { GatewayError } from '../http/errors.js'
import { fallbacksOfRows, parseInventoryFile, type ModelKind, type Query } from './inventory.js'
import { checkInventoryFile, type InventoryFile } from './inventory-schema.js'
import { cloneFleet, kindOfModel, type Fleet } from './fleet-rules.js'
import { hasColumn, hasTable, notMigrated } from './migrations.js'

export interface FleetStore {
  readonly source: 'mariadb' | 'file'
  read: () => Promise<Fleet>
  /** Runs `change` on the current fleet and stores what it changed, all or nothing. */
  change: <T>(change: (fleet: Fleet) => Promise<T> | T) => Promise<T>
}

/* ------------------------------------------------------------------------------------------ */
/* MariaDB                                                                                     */
/* ------------------------------------------------------------------------------------------ */

export interface TransactionalDb {
  query: Query
  /** `work` on one connection between BEGIN and COMMIT; rolled back when it throws. */
  transaction: <T>(work: (query: Query) => Promise<T>) => Promise<T>
}

const ER_DUP_ENTRY = 1062
const ER_ROW_IS_REFERENCED = 1451
const ER_NO_REFERENCED_ROW = 1452
const ER_DATA_TOO_LONG = 1406
const ER_WARN_DATA_OUT_OF_RANGE = 1264
const ER_LOCK_DEADLOCK = 1213

/** One table as the store writes it: primary key columns, then the others. Fixed names only. */
interface Table { name: string, key: string[], columns: string[] }

/** In the order rows are inserted (parents first); deletes go the other way. */
function tablesOf (schema: DbSchema): Table[] {
  return [
    { name: 'computers', key: ['id'], columns: ['name', 'ip_addr'] },
    { name: 'gpus', key: ['id'], columns: ['name', 'vram_size', 'computer_id', 'weight'] },
    { name: 'llms', key: ['name'], columns: ['size'] },
    { name: 'diffusors', key: ['name'], columns: ['size'] },
    { name: 'speech_models', key: ['name'], columns: [] },
    { name: 'assignments', key: ['id'], columns: schema.maxParallel ? ['name', 'model_name', 'port', 'max_parallel'] : ['name', 'model_name', 'port'] },
    { name: 'assignment_gpus', key: ['assignment_id', 'gpu_id'], columns: [] },
    ...(schema.drains ? [{ name: 'maestro_assignment_drains', key: ['assignment_id'], columns: [] }] : []),
    ...(schema.aliases
      ? [{ name: 'maestro_model_aliases', key: ['alias'], columns: ['model'] }, { name: 'maestro_model_fallbacks', key: ['model', 'position'], columns: ['fallback'] }]
      : [])
  ]
}

/** What the gateway's migrations have added to this database (they may not have run). */
interface DbSchema { maxParallel: boolean, drains: boolean, aliases: boolean }

type Rows = Map<string, unknown[]>

const TABLE_OF_KIND: Record<ModelKind, 'llms' | 'diffusors' | 'speech_models'> = { llm: 'llms', diffusor: 'diffusors', speech: 'speech_models' }

/** FLOAT columns come back as the nearest double (24.1 → 24.100000381…): show what was stored. */
const float = (v: unknown): number => Number(Number(v).toPrecision(7))
const int = (v: unknown): number => Number(v)
const str = (v: unknown): string => Buffer.isBuffer(v) ? v.toString('utf8') : String(v)

async function readSchema (query: Query): Promise<DbSchema> {
  const [maxParallel, drains, aliases] = await Promise.all([
    hasColumn(query, 'assignments', 'max_parallel'), hasTable(query, 'maestro_assignment_drains'), hasTable(query, 'maestro_model_aliases')
  ])
  return { maxParallel, drains, aliases }
}

/** The whole fleet; `lock` takes the rows for update, so concurrent changes run one after another. */
async function readFleet (query: Query, schema: DbSchema, lock: boolean): Promise<Fleet> {
  const forUpdate = lock ? ' FOR UPDATE' : ''
  // One after another on one connection (a transaction's connection runs one statement at a time).
  const computers = await query('SELECT id, name, ip_addr FROM computers ORDER BY id' + forUpdate)
  const gpus = await query('SELECT id, name, vram_size, computer_id, weight FROM gpus ORDER BY id' + forUpdate)
  const llms = await query('SELECT name, size FROM llms ORDER BY name' + forUpdate)
  const diffusors = await query('SELECT name, size FROM diffusors ORDER BY name' + forUpdate)
  const speech = await query('SELECT name FROM speech_models ORDER BY name' + forUpdate)
  const assignments = await query((schema.maxParallel
    ? 'SELECT id, name, model_name, port, max_parallel FROM assignments ORDER BY id'
    : 'SELECT id, name, model_name, port FROM assignments ORDER BY id') + forUpdate)
  const links = await query('SELECT assignment_id, gpu_id FROM assignment_gpus ORDER BY assignment_id, gpu_id' + forUpdate)
  const drains = schema.drains ? await query('SELECT assignment_id FROM maestro_assignment_drains' + forUpdate) : []
  const aliases = schema.aliases ? await query('SELECT alias, model FROM maestro_model_aliases ORDER BY alias' + forUpdate) : []
  const fallbacks = schema.aliases ? await query('SELECT model, position, fallback FROM maestro_model_fallbacks ORDER BY model, position' + forUpdate) : []
  const drained = new Set(drains.map((r) => str(r.assignment_id)))
  const gpusOf = new Map<string, number[]>()
  for (const l of links) {
    const id = str(l.assignment_id)
    gpusOf.set(id, [...(gpusOf.get(id) ?? []), int(l.gpu_id)])
  }
  const models: Fleet['models'] = [
    ...llms.map((r) => ({ kind: 'llm' as const, name: str(r.name), size: Number(r.size) })),
    ...diffusors.map((r) => ({ kind: 'diffusor' as const, name: str(r.name), size: Number(r.size) })),
    ...speech.map((r) => ({ kind: 'speech' as const, name: str(r.name) }))
  ]
  const fleet: Fleet = {
    computers: computers.map((r) => ({ id: int(r.id), name: str(r.name), ip: str(r.ip_addr) })),
    gpus: gpus.map((r) => ({
      id: int(r.id),
      name: str(r.name),
      vramGb: float(r.vram_size),
      computerId: int(r.computer_id),
      weight: r.weight === null ? null : float(r.weight)
    })),
    models,
    assignments: [],
    aliases: aliases.map((r) => ({ alias: str(r.alias), model: str(r.model) })),
    fallbacks: fallbacksOfRows(fallbacks)
  }
  for (const r of assignments) {
    const model = str(r.model_name)
    const kind = kindOfModel(fleet, model)
    fleet.assignments.push({
      id: int(r.id),
      name: str(r.name),
      model,
      ...(kind === undefined ? {} : { kind }),
      port: int(r.port),
      gpuIds: gpusOf.get(str(r.id)) ?? [],
      maxParallel: r.max_parallel == null ? 1 : int(r.max_parallel),
      drained: drained.has(str(r.id))
    })
  }
  return fleet
}

/** The fleet as rows of each table, keyed by primary key. */
function rowsOf (fleet: Fleet, schema: DbSchema): Map<string, Rows> {
  const tables = new Map<string, Rows>(tablesOf(schema).map((t) => [t.name, new Map()]))
  const put = (table: string, key: unknown[], values: unknown[]): void => {
    tables.get(table)?.set(JSON.stringify(key.map(String)), [...key, ...values])
  }
  for (const c of fleet.computers) put('computers', [c.id], [c.name, c.ip])
  for (const g of fleet.gpus) put('gpus', [g.id], [g.name, g.vramGb, g.computerId, g.weight])
  for (const m of fleet.models) put(TABLE_OF_KIND[m.kind], [m.name], m.kind === 'speech' ? [] : [m.size ?? 0])
  for (const a of fleet.assignments) {
    put('assignments', [a.id], schema.maxParallel ? [a.name, a.model, a.port, a.maxParallel] : [a.name, a.model, a.port])
    for (const g of a.gpuIds) put('assignment_gpus', [a.id, g], [])
    if (a.drained) put('maestro_assignment_drains', [a.id], [])
  }
  for (const a of fleet.aliases ?? []) put('maestro_model_aliases', [a.alias], [a.model])
  for (const f of fleet.fallbacks ?? []) f.fallbacks.forEach((fallback, position) => put('maestro_model_fallbacks', [f.model, position], [fallback]))
  return tables
}

const sameRow = (a: unknown[], b: unknown[]): boolean => a.length === b.length && a.every((v, i) => String(v) === String(b[i]))

/** The statements that turn `before` into `after`: deletes children first, then inserts and updates parents first. */
function statements (before: Fleet, after: Fleet, schema: DbSchema): Array<[string, unknown[]]> {
  const old = rowsOf(before, schema)
  const now = rowsOf(after, schema)
  const out: Array<[string, unknown[]]> = []
  const tables = tablesOf(schema)
  const where = (t: Table): string => t.key.map((k) => `${k} = ?`).join(' AND ')
  for (const t of [...tables].reverse()) {
    const next = now.get(t.name) as Rows
    for (const [key, row] of old.get(t.name) as Rows) {
      if (!next.has(key)) out.push([`DELETE FROM ${t.name} WHERE ${where(t)}`, row.slice(0, t.key.length)])
    }
  }
  for (const t of tables) {
    const prev = old.get(t.name) as Rows
    const all = [...t.key, ...t.columns]
    for (const [key, row] of now.get(t.name) as Rows) {
      const was = prev.get(key)
      if (was === undefined) {
        out.push([`INSERT INTO ${t.name} (${all.join(', ')}) VALUES (${all.map(() => '?').join(', ')})`, row])
      } else if (!sameRow(was, row) && t.columns.length > 0) {
        out.push([`UPDATE ${t.name} SET ${t.columns.map((c) => `${c} = ?`).join(', ')} WHERE ${where(t)}`,
          [...row.slice(t.key.length), ...row.slice(0, t.key.length)]])
      }
    }
  }
  return out
}

/** A change the migrations have not made room for yet. */
function assertMigrated (before: Fleet, after: Fleet, schema: DbSchema): void {
  if (!schema.drains && after.assignments.some((a) => a.drained)) {
    throw notMigrated('table for drained assignments')
  }
  if (!schema.aliases && ((after.aliases ?? []).length > 0 || (after.fallbacks ?? []).length > 0)) {
    throw notMigrated('tables for model aliases and fallbacks')
  }
  if (!schema.maxParallel) {
    const was = new Map(before.assignments.map((a) => [String(a.id), a.maxParallel]))
    if (after.assignments.some((a) => a.maxParallel !== (was.get(String(a.id)) ?? 1))) {
      throw notMigrated('assignments.max_parallel column')
    }
  }
}

/** Database refusals the rules could not see coming (a concurrent writer outside the gateway, a narrow column). */
function refusal (err: unknown): Error {
  const e = err as { errno?: number, sqlMessage?: string }
  const column = /column '([a-z_]+)'/i.exec(e.sqlMessage ?? '')?.[1]
  switch (e.errno) {
    case ER_DUP_ENTRY: return new GatewayError(409, 'a record with that name or id already exists')
    case ER_ROW_IS_REFERENCED:
    case ER_NO_REFERENCED_ROW: return new GatewayError(409, 'the inventory changed meanwhile (a referenced record was added or removed): try again')
    case ER_DATA_TOO_LONG:
      return new GatewayError(400, column === 'ip_addr'
        ? 'ip: longer than computers.ip_addr holds (the original VARCHAR(15)): run npm run migrate to widen it'
        : `a value is longer than its column${column === undefined ? '' : ` (${column})`} holds`)
    // The schemas bound every number by the original columns (services/fleet/inventory-schema.ts); this
    // is for a deployment whose columns are narrower.
    case ER_WARN_DATA_OUT_OF_RANGE:
      return new GatewayError(400, `a number is out of its column's range${column === undefined ? '' : ` (${column})`}`)
    default: return err as Error
  }
}

export function databaseFleetStore (db: TransactionalDb): FleetStore {
  return {
    source: 'mariadb',
    async read () {
      return await readFleet(db.query, await readSchema(db.query), false)
    },
    async change (change) {
      for (let attempt = 1; ; attempt++) {
        try {
          return await db.transaction(async (query) => {
            const schema = await readSchema(query)
            const before = await readFleet(query, schema, true)
            const after = cloneFleet(before)
            const result = await change(after)
            assertMigrated(before, after, schema)
            for (const [sql, params] of statements(before, after, schema)) await query(sql, params)
            return result
          })
        } catch (err) {
          // Two writers that locked in different orders: InnoDB rolled one back; run it again.
          if ((err as { errno?: number }).errno === ER_LOCK_DEADLOCK && attempt < 3) continue
          throw refusal(err)
        }
      }
    }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* The inventory file (embedded mode)                                                          */
/* ------------------------------------------------------------------------------------------ */

type Raw = Record<string, unknown>

/** Comment fields (`_…`, `$schema`) of the entry with this id, so a rewrite keeps them. */
function commentsOf (list: unknown, id: unknown): Raw {
  if (!Array.isArray(list)) return {}
  const entry = list.find((e) => typeof e === 'object' && e !== null && String((e as Raw).id) === String(id)) as Raw | undefined
  return Object.fromEntries(Object.entries(entry ?? {}).filter(([k]) => k.startsWith('_') || k.startsWith('$')))
}

function fleetOfFile (file: InventoryFile): Fleet {
  return {
    computers: file.computers.map((c) => ({ id: c.id, name: c.name, ip: c.ip })),
    gpus: file.gpus.map((g) => ({ id: g.id, name: g.name ?? `GPU ${g.id}`, vramGb: g.vram ?? 0, computerId: g.computer, weight: g.weight ?? null })),
    models: [
      ...(file.models?.llms ?? []).map((name) => ({ kind: 'llm' as const, name })),
      ...(file.models?.diffusors ?? []).map((name) => ({ kind: 'diffusor' as const, name })),
      ...(file.models?.speech ?? []).map((name) => ({ kind: 'speech' as const, name }))
    ],
    assignments: file.assignments.map((a) => ({
      id: a.id,
      name: a.name,
      model: a.model,
      ...(a.kind === undefined ? {} : { kind: a.kind }),
      port: a.port,
      gpuIds: a.gpus,
      maxParallel: a.parallel ?? 1,
      drained: a.drained === true
    })),
    aliases: Object.entries(file.aliases ?? {}).map(([alias, model]) => ({ alias, model })),
    fallbacks: Object.entries(file.fallbacks ?? {}).map(([model, fallbacks]) => ({ model, fallbacks }))
  }
}

/** The file with the fleet's records; every other field (comments, `apiKeys`) is kept as it was. */
function fileOfFleet (raw: Raw, fleet: Fleet): Raw {
  const names = (kind: ModelKind): string[] => fleet.models.filter((m) => m.kind === kind).map((m) => m.name)
  const models = typeof raw.models === 'object' && raw.models !== null ? raw.models as Raw : {}
  return {
    ...raw,
    computers: fleet.computers.map((c) => ({ ...commentsOf(raw.computers, c.id), id: c.id, name: c.name, ip: c.ip })),
    gpus: fleet.gpus.map((g) => ({
      ...commentsOf(raw.gpus, g.id),
      id: g.id,
      name: g.name,
      vram: g.vramGb,
      computer: g.computerId,
      ...(g.weight === null ? {} : { weight: g.weight })
    })),
    models: { ...models, llms: names('llm'), diffusors: names('diffusor'), speech: names('speech') },
    assignments: fleet.assignments.map((a) => ({
      ...commentsOf(raw.assignments, a.id),
      id: a.id,
      name: a.name,
      model: a.model,
      ...(a.kind === undefined ? {} : { kind: a.kind }),
      port: a.port,
      gpus: a.gpuIds,
      ...(a.maxParallel === 1 ? {} : { parallel: a.maxParallel }),
      ...(a.drained ? { drained: true } : {})
    })),
    ...namedLists(raw, 'aliases', Object.fromEntries((fleet.aliases ?? []).map((a) => [a.alias, a.model]))),
    ...namedLists(raw, 'fallbacks', Object.fromEntries((fleet.fallbacks ?? []).map((f) => [f.model, f.fallbacks])))
  }
}

/** `"aliases"` / `"fallbacks"` as objects; left out when empty and the file had none. */
function namedLists (raw: Raw, field: 'aliases' | 'fallbacks', value: Raw): Raw {
  return Object.keys(value).length === 0 && !(field in raw) ? {} : { [field]: value }
}

/** Replaces `path` with `content` so that no reader ever sees it half-written. */
export async function writeFileAtomically (path: string, content: string): Promise<void> {
  const temp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`)
  const handle = await open(temp, 'wx', 0o644)
  try {
    await handle.writeFile(content, 'utf8')
    await handle.sync()
  } catch (err) {
    await handle.close()
    await rm(temp, { force: true })
    throw err
  }
  await handle.close()
  try {
    await rename(temp, path)
  } catch (err) {
    await rm(temp, { force: true })
    throw err
  }
}

/**
 * The inventory file as a store. `writable` false (the package's built-in default file) refuses
 * every change: that file belongs to the installation, not to the operator.
 */
export function fileFleetStore (path: string, opts: { writable: boolean }): FleetStore {
  let queue: Promise<unknown> = Promise.resolve()
  const load = async (): Promise<{ raw: Raw, fleet: Fleet }> => {
    const raw = JSON.parse(await readFile(path, 'utf8')) as Raw
    return { raw, fleet: fleetOfFile(checkInventoryFile(raw)) }
  }
  return {
    source: 'file',
    async read () {
      return (await load()).fleet
    },
    async change (change) {
      if (!opts.writable) throw new GatewayError(409, 'the built-in inventory is read-only: set INVENTORY_FILE to a file of your own to change the fleet')
      // One change at a time in this process, each on the file as the last one left it.
      const run = queue.then(async () => {
        const { raw, fleet } = await load()
        const result = await change(fleet)
        const next = fileOfFleet(raw, fleet)
        // The whole file is checked as it will be read back; a change that breaks it is refused.
        try {
          parseInventoryFile(next, path)
        } catch (err) {
          throw new GatewayError(400, (err as Error).message.replace(/^inventory [^:]*: /, ''))
        }
        await writeFileAtomically(path, JSON.stringify(next, null, 2) + '\n')
        return result
      })
      queue = run.catch(() => {})
      return await run
    }
  }
}
