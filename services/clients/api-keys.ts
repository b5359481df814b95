/**
 * The API key store: who may call the gateway, and as which client (CONTRACT 12.3).
 *
 * Keys come from three places: `API_KEYS` (plain secrets, normal priority, no limits), the
 * gateway's own `api_keys` table in MariaDB, or, in embedded mode, the inventory file's `apiKeys`
 * list. Table and file hold only the SHA-256 of each secret. The request path reads an in-memory
 * copy (never MariaDB), refreshed every INVENTORY_REFRESH_MS and at once on `reload()`. No Fastify.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto'
import { readFile, rename, writeFile } from 'node:fs/promises'
import type { Query } from '../fleet/inventory.js'
import { hasColumn, hasTable, notMigrated } from '../fleet/migrations.js'
import { modelKey } from '../fleet/model-name.js'

export type Priority = 'high' | 'normal' | 'low'
export const PRIORITIES: readonly Priority[] = ['high', 'normal', 'low']

/** What a key may do; an absent limit is no limit. */
export interface ClientLimits {
  /** Requests of the key in flight at once (waiting for a GPU or on one). */
  maxConcurrent?: number
  /** Requests of the key waiting for a GPU at once. */
  maxQueued?: number
  /** Requests a minute (sliding window). */
  rpm?: number
  /** The only models the key may use, as given (matched like Ollama matches names). */
  models?: string[]
  /** Prompt + output tokens a UTC day / month (CONTRACT 17); over it, 429 until the window turns. */
  tokensPerDay?: number
  tokensPerMonth?: number
}

export type KeySource = 'env' | 'table' | 'file'

/** A key as the admin API shows it: never its secret, never its hash. */
export interface ApiKeyInfo {
  name: string
  source: KeySource
  priority: Priority
  limits: ClientLimits
  createdAt?: string
  revokedAt?: string
}

/** A key as stored: the SHA-256 of its secret (hex), never the secret. */
export interface StoredKey extends ApiKeyInfo {
  sha256: string
}

/** A key the request path can match: its hash as bytes, and its models as match keys. */
export interface ApiKey extends ApiKeyInfo {
  readonly hash: Buffer
  /** `modelKey` of each allowed model; undefined: every model. */
  readonly modelKeys?: ReadonlySet<string>
}

/** Bad input for a key (400), an unknown name (404) or a duplicate (409). */
export class ApiKeyError extends Error {
  constructor (readonly statusCode: 400 | 404 | 409, message: string) {
    super(message)
    this.name = 'ApiKeyError'
  }
}

export const KEY_NAME = /^[A-Za-z0-9._-]{1,64}$/
const SHA256_HEX = /^[0-9a-f]{64}$/
/** Largest value of a numeric limit (fits the INT columns). */
const LIMIT_MAX = 1_000_000_000
/** Largest token budget (fits the BIGINT columns with room; a trillion tokens). */
export const TOKEN_BUDGET_MAX = 1_000_000_000_000
const MODELS_MAX = 1000

export const sha256 = (text: string): Buffer => createHash('sha256').update(text, 'utf8').digest()
export const sha256Hex = (text: string): string => sha256(text).toString('hex')

/** A new secret: 32 random bytes, URL-safe, with a prefix that says what it is. */
export function newSecret (): string {
  return 'mst_' + randomBytes(32).toString('base64url')
}

/**
 * The name of the n-th (1-based) key of API_KEYS. `#` is not allowed in other keys' names, so it
 * never collides with one, and it says nothing about the secret.
 */
export const envKeyName = (n: number): string => `API_KEYS#${n}`

/* ------------------------------------------------------------------------------------------ */
/* Checking input (table rows, file entries and the admin API share these rules)              */
/* ------------------------------------------------------------------------------------------ */

function limit (value: unknown, field: string, min: number, max = LIMIT_MAX): number | undefined {
  if (value === undefined || value === null) return undefined
  const n = typeof value === 'string' && /^\d{1,16}$/.test(value) ? Number(value) : value
  if (typeof n !== 'number' || !Number.isInteger(n) || n < min || n > max) {
    throw new ApiKeyError(400, `${field} must be a whole number from ${min} to ${max} (or null for no limit)`)
  }
  return n
}

/**
 * A models list: an array of names, a JSON array in text, or a text list separated by commas,
 * spaces or new lines (as an operator may write it into the table by hand). Empty: every model.
 */
export function parseModels (value: unknown, field = 'models'): string[] | undefined {
  if (value === undefined || value === null) return undefined
  let list: unknown = value
  if (Buffer.isBuffer(list)) list = list.toString('utf8')
  if (typeof list === 'string') {
    const text = list.trim()
    if (text === '') return undefined
    if (text.startsWith('[')) {
      try { list = JSON.parse(text) } catch { throw new ApiKeyError(400, `${field} is not a valid JSON array`) }
    } else {
      list = text.split(/[\s,]+/).filter(Boolean)
    }
  }
  if (!Array.isArray(list) || list.some((m) => typeof m !== 'string' || m === '' || m.length > 256)) {
    throw new ApiKeyError(400, `${field} must be a list of model names`)
  }
  if (list.length > MODELS_MAX) throw new ApiKeyError(400, `${field} may name at most ${MODELS_MAX} models`)
  return list.length === 0 ? undefined : [...new Set(list as string[])]
}

export function parsePriority (value: unknown, field = 'priority'): Priority {
  if (value === undefined || value === null || value === '') return 'normal'
  if (typeof value !== 'string' || !(PRIORITIES as readonly string[]).includes(value)) {
    throw new ApiKeyError(400, `${field} must be one of ${PRIORITIES.join(', ')}`)
  }
  return value as Priority
}

/** The limits of a record with `maxConcurrent`, `maxQueued`, `rpm`, `models` fields (any may be absent). */
export function parseLimits (o: Record<string, unknown>, path = ''): ClientLimits {
  const limits: ClientLimits = {}
  const maxConcurrent = limit(o.maxConcurrent, `${path}maxConcurrent`, 1)
  // a key may not wait at all only by being refused: 0 would refuse every request (see README)
  const maxQueued = limit(o.maxQueued, `${path}maxQueued`, 1)
  const rpm = limit(o.rpm, `${path}rpm`, 1)
  const models = parseModels(o.models, `${path}models`)
  const tokensPerDay = limit(o.tokensPerDay, `${path}tokensPerDay`, 1, TOKEN_BUDGET_MAX)
  const tokensPerMonth = limit(o.tokensPerMonth, `${path}tokensPerMonth`, 1, TOKEN_BUDGET_MAX)
  if (maxConcurrent !== undefined) limits.maxConcurrent = maxConcurrent
  if (maxQueued !== undefined) limits.maxQueued = maxQueued
  if (rpm !== undefined) limits.rpm = rpm
  if (models !== undefined) limits.models = models
  if (tokensPerDay !== undefined) limits.tokensPerDay = tokensPerDay
  if (tokensPerMonth !== undefined) limits.tokensPerMonth = tokensPerMonth
  return limits
}

export function checkName (value: unknown): string {
  if (typeof value !== 'string' || !KEY_NAME.test(value)) {
    throw new ApiKeyError(400, 'name must be 1 to 64 letters, digits, \'.\', \'_\' or \'-\'')
  }
  return value
}

function iso (v: unknown): string | undefined {
  if (v === undefined || v === null || v === '') return undefined
  const d = v instanceof Date ? v : new Date(String(v))
  return Number.isNaN(d.getTime()) ? undefined : d.toISOString()
}

function matchable (k: StoredKey): ApiKey {
  const { sha256: hex, ...info } = k
  return {
    ...info,
    hash: Buffer.from(hex, 'hex'),
    modelKeys: k.limits.models == null ? undefined : new Set(k.limits.models.map(modelKey))
  }
}

/** The public view of a key. */
export function keyInfo (k: ApiKeyInfo): ApiKeyInfo {
  const out: ApiKeyInfo = { name: k.name, source: k.source, priority: k.priority, limits: k.limits }
  if (k.createdAt !== undefined) out.createdAt = k.createdAt
  if (k.revokedAt !== undefined) out.revokedAt = k.revokedAt
  return out
}

/* ------------------------------------------------------------------------------------------ */
/* Where keys are kept                                                                         */
/* ------------------------------------------------------------------------------------------ */

export interface KeyChange {
  priority?: Priority
  /** Each present field replaces that limit; null removes it. */
  limits?: Partial<Record<keyof ClientLimits, unknown>>
}

/** The keys of the table or the file, and the writes the admin API makes to them. */
export interface KeyBackend {
  readonly source: 'table' | 'file'
  /** Every key, revoked ones included. */
  load: () => Promise<StoredKey[]>
  insert: (key: StoredKey) => Promise<void>
  /** False when there is no key of that name. */
  update: (name: string, priority: Priority, limits: ClientLimits) => Promise<boolean>
  /** False when there is no live key of that name. */
  revoke: (name: string) => Promise<boolean>
  /** Throws the refusal when writes cannot be kept here yet (a table `npm run migrate` has not made). */
  assertWritable?: () => Promise<void>
}

const ER_NO_SUCH_TABLE = 1146
const ER_DUP_ENTRY = 1062

/** The migration that adds the budget columns to `api_keys`. */
export const BUDGET_MIGRATION = '008-api-keys-token-budgets'

const hasBudget = (limits: ClientLimits): boolean => limits.tokensPerDay != null || limits.tokensPerMonth != null

/** The `api_keys` table (migration 004; budgets: 008). Fixed SQL, values as placeholders. */
export function tableBackend (query: Query): KeyBackend {
  // Once seen, the budget columns stay (a migration never drops a column).
  let budgetColumns = false
  const withBudgets = async (): Promise<boolean> => {
    budgetColumns ||= await hasColumn(query, 'api_keys', 'tokens_per_day')
    return budgetColumns
  }
  /** A budget on a table without its columns: 409 naming the migration. */
  const assertBudgetsWritable = async (limits: ClientLimits): Promise<boolean> => {
    const columns = await withBudgets()
    if (!columns && hasBudget(limits)) throw notMigrated(`api_keys.tokens_per_day and tokens_per_month columns (migration ${BUDGET_MIGRATION})`)
    return columns
  }
  return {
    source: 'table',
    async assertWritable () {
      if (!await hasTable(query, 'api_keys')) throw notMigrated('api_keys table')
    },
    async load () {
      let rows: any[]
      try {
        rows = await query(await withBudgets()
          ? 'SELECT name, secret_sha256, priority, max_concurrent, max_queued, rpm, models, tokens_per_day, tokens_per_month, created_at, revoked_at FROM api_keys ORDER BY id'
          : 'SELECT name, secret_sha256, priority, max_concurrent, max_queued, rpm, models, created_at, revoked_at FROM api_keys ORDER BY id')
      } catch (err) {
        // not migrated yet: no keys in the table
        if ((err as { errno?: number }).errno === ER_NO_SUCH_TABLE) return []
        throw err
      }
      const keys: StoredKey[] = []
      for (const r of rows) {
        const name = String(r.name)
        const hex = String(r.secret_sha256).toLowerCase()
        if (!SHA256_HEX.test(hex)) throw new Error(`api_keys: key ${JSON.stringify(name)} has a secret_sha256 that is not 64 hex digits`)
        let limits: ClientLimits
        try {
          limits = parseLimits({
            maxConcurrent: r.max_concurrent,
            maxQueued: r.max_queued,
            rpm: r.rpm,
            models: r.models,
            tokensPerDay: r.tokens_per_day == null ? null : Number(r.tokens_per_day),
            tokensPerMonth: r.tokens_per_month == null ? null : Number(r.tokens_per_month)
          })
        } catch (err) {
          throw new Error(`api_keys: key ${JSON.stringify(name)}: ${(err as Error).message}`)
        }
        keys.push({
          name,
          source: 'table',
          sha256: hex,
          priority: parsePriority(r.priority),
          limits,
          createdAt: iso(r.created_at),
          revokedAt: iso(r.revoked_at)
        })
      }
      return keys
    },
    async insert (k) {
      const budgets = await assertBudgetsWritable(k.limits)
      const values = [k.name, k.sha256, k.priority, k.limits.maxConcurrent ?? null, k.limits.maxQueued ?? null, k.limits.rpm ?? null,
        k.limits.models == null ? null : JSON.stringify(k.limits.models)]
      try {
        if (budgets) {
          await query('INSERT INTO api_keys (name, secret_sha256, priority, max_concurrent, max_queued, rpm, models, tokens_per_day, tokens_per_month) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
            [...values, k.limits.tokensPerDay ?? null, k.limits.tokensPerMonth ?? null])
        } else {
          await query('INSERT INTO api_keys (name, secret_sha256, priority, max_concurrent, max_queued, rpm, models) VALUES (?, ?, ?, ?, ?, ?, ?)', values)
        }
      } catch (err) {
        if ((err as { errno?: number }).errno === ER_DUP_ENTRY) throw new ApiKeyError(409, `an API key named '${k.name}' already exists`)
        throw err
      }
    },
    async update (name, priority, limits) {
      const values = [priority, limits.maxConcurrent ?? null, limits.maxQueued ?? null, limits.rpm ?? null,
        limits.models == null ? null : JSON.stringify(limits.models)]
      const result: any = await assertBudgetsWritable(limits)
        ? await query('UPDATE api_keys SET priority = ?, max_concurrent = ?, max_queued = ?, rpm = ?, models = ?, tokens_per_day = ?, tokens_per_month = ? WHERE name = ?',
          [...values, limits.tokensPerDay ?? null, limits.tokensPerMonth ?? null, name])
        : await query('UPDATE api_keys SET priority = ?, max_concurrent = ?, max_queued = ?, rpm = ?, models = ? WHERE name = ?', [...values, name])
      return Number(result?.affectedRows ?? 0) > 0
    },
    async revoke (name) {
      const result: any = await query('UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP WHERE name = ? AND revoked_at IS NULL', [name])
      return Number(result?.affectedRows ?? 0) > 0
    }
  }
}

const FILE_KEY_FIELDS = ['name', 'sha256', 'priority', 'maxConcurrent', 'maxQueued', 'rpm', 'models', 'tokensPerDay', 'tokensPerMonth', 'createdAt', 'revokedAt']

/** One entry of an inventory file's `apiKeys` list, checked. */
export function parseFileKey (raw: unknown, path: string): StoredKey {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new Error(`${path} must be an object`)
  const o = raw as Record<string, unknown>
  for (const k of Object.keys(o)) {
    if (!k.startsWith('_') && !FILE_KEY_FIELDS.includes(k)) throw new Error(`${path} has unknown field ${JSON.stringify(k)} (expected ${FILE_KEY_FIELDS.join(', ')})`)
  }
  try {
    const name = checkName(o.name)
    if (typeof o.sha256 !== 'string' || !SHA256_HEX.test(o.sha256.toLowerCase())) {
      throw new ApiKeyError(400, 'sha256 must be the SHA-256 of the secret in 64 hex digits (the file never holds the secret)')
    }
    return {
      name,
      source: 'file',
      sha256: o.sha256.toLowerCase(),
      priority: parsePriority(o.priority),
      limits: parseLimits(o),
      createdAt: iso(o.createdAt),
      revokedAt: iso(o.revokedAt)
    }
  } catch (err) {
    throw new Error(`${path}: ${(err as Error).message}`)
  }
}

function fileEntry (k: StoredKey): Record<string, unknown> {
  return {
    name: k.name,
    sha256: k.sha256,
    priority: k.priority,
    ...k.limits,
    ...(k.createdAt !== undefined ? { createdAt: k.createdAt } : {}),
    ...(k.revokedAt !== undefined ? { revokedAt: k.revokedAt } : {})
  }
}

/** The `apiKeys` list of an inventory file (embedded mode); writes replace the file atomically. */
export function fileBackend (file: string): KeyBackend {
  const read = async (): Promise<Record<string, unknown>> => {
    const json = JSON.parse(await readFile(file, 'utf8')) as unknown
    if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new Error(`inventory ${file}: not an object`)
    return json as Record<string, unknown>
  }
  const keysOf = (json: Record<string, unknown>): StoredKey[] => {
    if (json.apiKeys === undefined) return []
    if (!Array.isArray(json.apiKeys)) throw new Error(`inventory ${file}: apiKeys must be an array`)
    const keys = json.apiKeys.map((raw, i) => parseFileKey(raw, `inventory ${file}: apiKeys[${i}]`))
    const names = new Set<string>()
    for (const k of keys) {
      if (names.has(k.name)) throw new Error(`inventory ${file}: apiKeys names ${JSON.stringify(k.name)} twice`)
      names.add(k.name)
    }
    return keys
  }
  // One write at a time; each is a new file renamed over the old one (never seen half-written).
  let writing: Promise<unknown> = Promise.resolve()
  const change = async <T>(fn: (keys: StoredKey[]) => T): Promise<T> => {
    const run = writing.then(async () => {
      const json = await read()
      const keys = keysOf(json)
      const result = fn(keys)
      json.apiKeys = keys.map(fileEntry)
      const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`
      await writeFile(tmp, JSON.stringify(json, null, 2) + '\n')
      await rename(tmp, file)
      return result
    })
    writing = run.catch(() => {})
    return await run
  }
  return {
    source: 'file',
    load: async () => keysOf(await read()),
    insert: async (key) => {
      await change((keys) => {
        if (keys.some((k) => k.name === key.name)) throw new ApiKeyError(409, `an API key named '${key.name}' already exists`)
        keys.push({ ...key, createdAt: key.createdAt ?? new Date().toISOString() })
      })
    },
    update: async (name, priority, limits) => await change((keys) => {
      const k = keys.find((k) => k.name === name)
      if (k === undefined) return false
      k.priority = priority
      k.limits = limits
      return true
    }),
    revoke: async (name) => await change((keys) => {
      const k = keys.find((k) => k.name === name && k.revokedAt === undefined)
      if (k === undefined) return false
      k.revokedAt = new Date().toISOString()
      return true
    })
  }
}

/* ------------------------------------------------------------------------------------------ */
/* The store                                                                                   */
/* ------------------------------------------------------------------------------------------ */

export interface ApiKeyStoreOptions {
  /** The plain secrets of API_KEYS. */
  envKeys: string[]
  /** The table or the file; none: API_KEYS only. */
  backend?: KeyBackend
  refreshMs: number
  /** Told after a write by the admin API, so other replicas read the keys again. */
  changed?: () => Promise<void>
  log?: { warn: (obj: object, msg: string) => void }
}

export interface NewKey {
  name: unknown
  priority?: unknown
  maxConcurrent?: unknown
  maxQueued?: unknown
  rpm?: unknown
  models?: unknown
  tokensPerDay?: unknown
  tokensPerMonth?: unknown
}

/**
 * The keys in memory, for the request path: `match()` answers which key a secret is, comparing
 * its SHA-256 with every key's in constant time.
 */
export class ApiKeyStore {
  private readonly envKeys: ApiKey[]
  private backendKeys: ApiKey[] = []
  /** Live keys (not revoked) to compare against: API_KEYS first. */
  private live: ApiKey[]
  private loaded = false
  private timer?: NodeJS.Timeout
  private loading?: Promise<void>
  private lastError?: string

  constructor (private readonly opts: ApiKeyStoreOptions) {
    const secrets = [...new Set(opts.envKeys)]
    this.envKeys = secrets.map((secret, i) => matchable({
      name: envKeyName(i + 1), source: 'env', sha256: sha256Hex(secret), priority: 'normal', limits: {}
    }))
    this.live = this.envKeys
  }

  /**
   * First read. A file that cannot be used stops the start (it is the operator's to fix); a table
   * that cannot be read now is retried every period, refusing every key meanwhile (`configured`).
   */
  async start (): Promise<void> {
    await this.reload()
    if (this.opts.backend == null) return
    if (this.opts.backend.source === 'file' && this.lastError !== undefined) throw new Error(this.lastError)
    this.timer = setInterval(() => { void this.reload() }, Math.max(50, this.opts.refreshMs))
    this.timer.unref()
  }

  close (): void {
    if (this.timer != null) clearInterval(this.timer)
  }

  /** Read the table or file again now (concurrent calls share a read that starts after them). */
  async reload (): Promise<void> {
    const backend = this.opts.backend
    if (backend == null) return
    while (this.loading != null) await this.loading
    this.loading = (async () => {
      try {
        const keys = (await backend.load()).map(matchable)
        this.backendKeys = keys
        this.live = [...this.envKeys, ...keys.filter((k) => k.revokedAt === undefined)]
        this.loaded = true
        this.lastError = undefined
      } catch (err) {
        if (this.lastError !== (err as Error).message) {
          this.opts.log?.warn({ err, source: backend.source }, 'API keys could not be read; keeping the last good ones')
        }
        this.lastError = (err as Error).message
      }
    })().finally(() => { this.loading = undefined })
    await this.loading
  }

  /**
   * True when a key is needed: API_KEYS is set, or the table or file holds a key (a revoked one
   * too: revoking the last key must not open the gateway to everyone), or they could not be read
   * yet (fail closed).
   */
  get configured (): boolean {
    return this.envKeys.length > 0 || this.backendKeys.length > 0 || (this.opts.backend != null && !this.loaded)
  }

  /** The live key whose secret this is. Every live key is compared, in constant time each. */
  match (secret: string | undefined): ApiKey | undefined {
    if (secret === undefined) return undefined
    const presented = sha256(secret)
    let found: ApiKey | undefined
    for (const key of this.live) {
      if (timingSafeEqual(presented, key.hash) && found === undefined) found = key
    }
    return found
  }

  /** Every key (API_KEYS ones by name only), revoked ones too; never a secret or a hash. */
  list (): ApiKeyInfo[] {
    return [...this.envKeys, ...this.backendKeys].map(keyInfo)
  }

  /** Where writes go, once it can take them. */
  private async backend (): Promise<KeyBackend> {
    if (this.opts.backend == null) throw new ApiKeyError(400, 'no key store to write to: keys come from API_KEYS only')
    await this.opts.backend.assertWritable?.()
    return this.opts.backend
  }

  private async written (): Promise<void> {
    await this.reload()
    await this.opts.changed?.().catch((err) => this.opts.log?.warn({ err }, 'API keys changed, but other replicas could not be told'))
  }

  /** Create a key; its secret is in the answer and nowhere else, ever. */
  async create (input: NewKey): Promise<{ key: string, info: ApiKeyInfo }> {
    const backend = await this.backend()
    const name = checkName(input.name)
    const secret = newSecret()
    const stored: StoredKey = {
      name,
      source: backend.source,
      sha256: sha256Hex(secret),
      priority: parsePriority(input.priority),
      limits: parseLimits({ ...input })
    }
    await backend.insert(stored)
    await this.written()
    const info = this.list().find((k) => k.name === name && k.source === backend.source) ?? keyInfo(stored)
    return { key: secret, info }
  }

  /** Change a key's priority and limits: fields present replace, null removes a limit. */
  async update (name: string, change: KeyChange): Promise<ApiKeyInfo> {
    const backend = await this.backend()
    const current = this.backendKeys.find((k) => k.name === name) ?? (await backend.load()).find((k) => k.name === name)
    if (current === undefined) throw new ApiKeyError(404, `no API key named '${name}'`)
    const priority = change.priority === undefined ? current.priority : parsePriority(change.priority)
    const merged: Record<string, unknown> = { ...current.limits }
    for (const [field, value] of Object.entries(change.limits ?? {})) merged[field] = value
    const limits = parseLimits(merged)
    if (!await backend.update(name, priority, limits)) throw new ApiKeyError(404, `no API key named '${name}'`)
    await this.written()
    return this.list().find((k) => k.name === name && k.source === backend.source) as ApiKeyInfo
  }

  /** Revoke a key: it stops working on every replica at once (the caller's replica before this resolves). */
  async revoke (name: string): Promise<void> {
    if (!await (await this.backend()).revoke(name)) throw new ApiKeyError(404, `no live API key named '${name}'`)
    await this.written()
  }
}
