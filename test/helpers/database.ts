/**
 * A fresh MariaDB database per test, with the original ai-maestro schema, dropped afterwards.
 * Real MariaDB only: when it cannot be reached the test fails (it is never skipped).
 */
import { randomBytes } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import mysql, { type Connection, type Pool } from 'mysql2/promise'
import type { Test } from 'tap'
import type { Query } from '../../services/fleet/inventory.js'
import { migrate } from '../../services/fleet/migrations.js'

export const DEFAULT_MARIADB_URL = 'mysql://root@127.0.0.1:3306'

const SCHEMA_FILE = new URL('../../docker/initdb/01-original-schema.sql', import.meta.url)

export interface TestDatabase {
  /** mysql:// URL of the new database, for MARIADB_URL or a plugin option. */
  url: string
  name: string
  query: Query
  pool: Pool
}

/** The server URL tests use: MARIADB_URL, else root on 127.0.0.1:3306 (any database path dropped). */
export function serverUrl (): URL {
  const raw = process.env.MARIADB_URL !== undefined && process.env.MARIADB_URL !== ''
    ? process.env.MARIADB_URL
    : DEFAULT_MARIADB_URL
  const url = new URL(raw)
  url.pathname = '/'
  url.search = ''
  return url
}

function redact (url: URL): string {
  const copy = new URL(url)
  if (copy.password !== '') copy.password = '***'
  return copy.toString()
}

export function queryOf (pool: Pool): Query {
  return async (sql, params) => {
    const [rows] = await pool.query(sql, params)
    return rows as any[]
  }
}

/**
 * Creates `maestro_test_<pid>_<random>` with the original schema (and the gateway's migrations when
 * `migrate: true`), and registers a teardown that closes the pool and drops the database.
 */
export async function createTestDatabase (t: Pick<Test, 'teardown'>, opts: { migrate?: boolean } = {}): Promise<TestDatabase> {
  const server = serverUrl()
  const name = `maestro_test_${process.pid}_${randomBytes(5).toString('hex')}`
  let admin: Connection
  try {
    admin = await mysql.createConnection(server.toString())
  } catch (err) {
    const e = err as { message?: string, code?: string }
    throw new Error(`tests need a MariaDB: cannot connect to ${redact(server)} (${e.message !== undefined && e.message !== '' ? e.message : e.code ?? String(err)}); set MARIADB_URL`)
  }
  const dbUrl = new URL(server)
  dbUrl.pathname = `/${name}`
  let pool: Pool | undefined
  t.teardown(async () => {
    await pool?.end()
    try {
      await admin.query(`DROP DATABASE IF EXISTS \`${name}\``)
    } finally {
      await admin.end()
    }
  })
  await admin.query(`CREATE DATABASE \`${name}\` CHARACTER SET utf8mb4`)

  const schema = await readFile(SCHEMA_FILE, 'utf8')
  const loader = await mysql.createConnection({ uri: dbUrl.toString(), multipleStatements: true })
  try {
    await loader.query(schema)
  } finally {
    await loader.end()
  }

  pool = mysql.createPool({ uri: dbUrl.toString(), connectionLimit: 4 })
  const query = queryOf(pool)
  if (opts.migrate === true) await migrate(query)
  return { url: dbUrl.toString(), name, query, pool }
}

/* ------------------------------------------------------------------------------------------ */

export interface FleetSpec {
  /** default: one computer `box` at 127.0.0.1 */
  computers?: Array<{ id?: number, name?: string, ip?: string }>
  /** `computer`: index into `computers` or its name (default 0); `weight` default null; id default next free */
  gpus?: Array<{ id?: number, name?: string, vram?: number, computer?: number | string, weight?: number | null }>
  llms?: string[]
  diffusors?: string[]
  speech?: string[]
  /** `gpus`: GPU ids (as returned in `gpus`, which are 1, 2, ... on a fresh database unless given) */
  assignments?: Array<{ id?: number, name?: string, model: string, port: number, gpus: number[] }>
}

export interface SeededFleet {
  /** inserted ids, in the order of the spec */
  computers: number[]
  gpus: number[]
  assignments: number[]
}

async function nextId (query: Query, table: 'computers' | 'gpus' | 'assignments'): Promise<number> {
  const sql = {
    computers: 'SELECT COALESCE(MAX(id), 0) + 1 AS next FROM computers',
    gpus: 'SELECT COALESCE(MAX(id), 0) + 1 AS next FROM gpus',
    assignments: 'SELECT COALESCE(MAX(id), 0) + 1 AS next FROM assignments'
  }[table]
  const [row] = await query(sql)
  return Number(row.next)
}

/**
 * Inserts a fleet into the original tables (all values as parameters). Ids not given are the next
 * free ones, so on a fresh database GPUs are 1, 2, ... in spec order.
 */
export async function seedInventory (query: Query, fleet: FleetSpec): Promise<SeededFleet> {
  const out: SeededFleet = { computers: [], gpus: [], assignments: [] }
  const computers = fleet.computers ?? [{ name: 'box', ip: '127.0.0.1' }]
  let next = await nextId(query, 'computers')
  for (const [i, c] of computers.entries()) {
    const id = c.id ?? next
    next = Math.max(next, id) + 1
    await query('INSERT INTO computers (id, name, ip_addr) VALUES (?, ?, ?)', [id, c.name ?? `computer-${i + 1}`, c.ip ?? '127.0.0.1'])
    out.computers.push(id)
  }

  next = await nextId(query, 'gpus')
  for (const [i, g] of (fleet.gpus ?? []).entries()) {
    const ref = g.computer ?? 0
    const index = typeof ref === 'number' ? ref : computers.findIndex(c => c.name === ref)
    const computerId = out.computers[index]
    if (computerId === undefined) throw new Error(`seedInventory: gpus[${i}].computer ${JSON.stringify(ref)} is not in computers`)
    const id = g.id ?? next
    next = Math.max(next, id) + 1
    await query('INSERT INTO gpus (id, name, vram_size, computer_id, weight) VALUES (?, ?, ?, ?, ?)',
      [id, g.name ?? `GPU ${id}`, g.vram ?? 24, computerId, g.weight ?? null])
    out.gpus.push(id)
  }

  for (const name of fleet.llms ?? []) await query('INSERT INTO llms (name, size) VALUES (?, ?)', [name, 0])
  for (const name of fleet.diffusors ?? []) await query('INSERT INTO diffusors (name, size) VALUES (?, ?)', [name, 0])
  for (const name of fleet.speech ?? []) await query('INSERT INTO speech_models (name) VALUES (?)', [name])

  next = await nextId(query, 'assignments')
  for (const [i, a] of (fleet.assignments ?? []).entries()) {
    const id = a.id ?? next
    next = Math.max(next, id) + 1
    await query('INSERT INTO assignments (id, name, model_name, port) VALUES (?, ?, ?, ?)', [id, a.name ?? `assignment-${i + 1}`, a.model, a.port])
    for (const gpu of a.gpus) await query('INSERT INTO assignment_gpus (assignment_id, gpu_id) VALUES (?, ?)', [id, gpu])
    out.assignments.push(id)
  }
  return out
}
