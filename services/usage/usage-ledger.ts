/**
 * The usage ledger (CONTRACT 17): what each finished request used, counted at once per client,
 * model, assignment and hour. Counts wait in a buffer (Redis, shared by the replicas; or process
 * memory in embedded mode) until the roll-up (usage-rollup.ts) moves them into MariaDB in sealed
 * batches; the report (usage-report.ts) adds what is still buffered to what is in MariaDB.
 */

/** Every counter, in the order of the table's columns and of a CSV's header. */
export const USAGE_COUNTERS = [
  'requests', 'promptTokens', 'cachedPromptTokens', 'outputTokens', 'images', 'audioSeconds', 'gpuSeconds', 'errors'
] as const
export type UsageCounter = typeof USAGE_COUNTERS[number]
export type UsageCounts = Record<UsageCounter, number>

/** Counters that hold fractions (seconds, to the millisecond); the others are whole numbers. */
export const FRACTIONAL_COUNTERS: ReadonlySet<UsageCounter> = new Set(['audioSeconds', 'gpuSeconds'])

/**
 * One finished request (or several of one client, model and assignment). Counts left out are 0;
 * `at` (ms since the epoch) defaults to now. The capture's one line per request:
 * `void fastify.usage.record({ client, model, assignment, requests: 1, promptTokens, outputTokens, gpuSeconds })`.
 */
export interface UsageEntry extends Partial<UsageCounts> {
  /** the API key's name, else the client's address */
  client: string
  model: string
  /** the assignment that served it ('' when none did) */
  assignment: string
  at?: number
  /** The API key's name when the client is a key: its prompt + output tokens count against its budgets too. */
  budgetKey?: string
}

/** Prompt + output tokens a key used in the UTC day and month of an instant (CONTRACT 17, budgets). */
export interface TokensUsed {
  day: number
  month: number
}

/** One hour's counts of one client, model and assignment. */
export interface UsageCell {
  /** start of the hour, ms since the epoch (UTC) */
  hour: number
  client: string
  model: string
  assignment: string
  counts: UsageCounts
}

/** Counts sealed by one roll-up for one hour: applied to MariaDB once, under its id. */
export interface UsageBatch {
  /** `<roll-up id>:<hour ms>`; the key of maestro_usage_rollups */
  id: string
  hour: number
  cells: UsageCell[]
}

/** What is buffered and not yet in MariaDB, read at one instant. */
export interface BufferedUsage {
  /** Changes whenever counts are sealed into batches (a report retries when it changed under it). */
  generation: number
  /** counts not sealed yet */
  live: UsageCell[]
  /** sealed batches, applied or not (the report asks MariaDB which ones are) */
  batches: UsageBatch[]
}

export interface UsageLedger {
  /**
   * Adds the entry's counts, at once or within a few ms (the Redis ledger sends a batch every
   * RECORD_EVERY_MS); resolves when they are in. Never throws (a failure is reported to `onError`).
   */
  record: (entry: UsageEntry) => Promise<void>
  /** Sends what is still to be sent (a replica shutting down). */
  close?: () => Promise<void>
  /** Everything buffered for hours starting in [fromHour, to), plus every sealed batch. */
  buffered: (fromHour: number, to: number) => Promise<BufferedUsage>
  /** The generation alone (cheap): equal to an earlier read's when nothing was sealed since. */
  generation: () => Promise<number>
  /** Moves every buffered count into batches of this roll-up id, atomically, one batch per hour. */
  seal: (rollupId: string) => Promise<void>
  /** Every sealed batch not yet dropped (a roll-up that died leaves its batches here). */
  batches: () => Promise<UsageBatch[]>
  /** Forgets a batch once MariaDB has it. */
  drop: (batchId: string) => Promise<void>
  /** Each key's tokens in the UTC day and month of `at` (the budgets' counters, kept beside the hours). */
  tokensUsed: (keys: string[], at: number) => Promise<TokensUsed[]>
}

export const DAY_MS = 86_400_000

/** The UTC day and month of an instant: their names (the counters' keys) and when each turns. */
export function budgetWindows (at: number): { day: string, month: string, dayEnd: number, monthEnd: number } {
  const d = new Date(at)
  const dayStart = Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate())
  const iso = new Date(dayStart).toISOString()
  return { day: iso.slice(0, 10), month: iso.slice(0, 7), dayEnd: dayStart + DAY_MS, monthEnd: Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 1) }
}

/** Tokens that count against a budget: the whole prompt and the output. */
export function budgetTokens (counts: UsageCounts): number {
  return counts.promptTokens + counts.outputTokens
}

export const HOUR_MS = 3_600_000
/** Without MariaDB, the buffer is all there is: hours older than this are forgotten. */
export const USAGE_RETENTION_MS = 31 * 24 * HOUR_MS
/** Longest client, model or assignment name kept (the table's columns hold this many characters). */
export const USAGE_NAME_MAX = 200
/** One request's count is capped here: a lying upstream cannot overflow a sum. */
const COUNT_MAX = 2 ** 32

export function hourOf (ms: number): number {
  return ms - (ms % HOUR_MS)
}

export function zeroCounts (): UsageCounts {
  return { requests: 0, promptTokens: 0, cachedPromptTokens: 0, outputTokens: 0, images: 0, audioSeconds: 0, gpuSeconds: 0, errors: 0 }
}

export function addCounts (into: UsageCounts, from: UsageCounts): void {
  for (const c of USAGE_COUNTERS) into[c] += from[c]
}

/** Fractions to the millisecond, and what sums of them gather in binary floating point rounded off. */
export function roundFraction (n: number): number {
  return Math.round(n * 1000) / 1000
}

function countOf (counter: UsageCounter, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) return 0
  const capped = Math.min(value, COUNT_MAX)
  return FRACTIONAL_COUNTERS.has(counter) ? roundFraction(capped) : Math.floor(capped)
}

/** Names longer than the column are cut (by code point, never inside a character). */
function nameOf (value: unknown): string {
  const s = typeof value === 'string' ? value : ''
  if (s.length <= USAGE_NAME_MAX) return s
  return Array.from(s).slice(0, USAGE_NAME_MAX).join('')
}

/** The entry as stored: names bounded, counts whole (or to the ms), finite and not negative. */
export function normaliseEntry (entry: UsageEntry): { hour: number, client: string, model: string, assignment: string, counts: UsageCounts } {
  const counts = zeroCounts()
  for (const c of USAGE_COUNTERS) counts[c] = countOf(c, entry[c])
  const at = typeof entry.at === 'number' && Number.isFinite(entry.at) && entry.at >= 0 ? entry.at : Date.now()
  return { hour: hourOf(at), client: nameOf(entry.client), model: nameOf(entry.model), assignment: nameOf(entry.assignment), counts }
}

/**
 * A buffered count's name is client, model, assignment and counter as one JSON array, so no name
 * can pose as a separator (a comma or quote in a name is escaped by JSON, never taken as a
 * boundary). This is its part before the counter, `["client","model","assignment",`: the field is
 * that + JSON.stringify(counter) + `]`, one stringify for all of a request's counters.
 */
export function cellFieldPrefix (client: string, model: string, assignment: string): string {
  const names = JSON.stringify([client, model, assignment])
  return names.slice(0, -1) + ','
}

/** Fields and values of one hour's buffer (a Redis hash) back into cells; unreadable fields are skipped. */
export function cellsOf (hour: number, fields: Record<string, string>): UsageCell[] {
  const cells = new Map<string, UsageCell>()
  for (const [field, value] of Object.entries(fields)) {
    let parsed: unknown
    try { parsed = JSON.parse(field) } catch { continue }
    if (!Array.isArray(parsed) || parsed.length !== 4 || !parsed.every((p) => typeof p === 'string')) continue
    const [client, model, assignment, counter] = parsed as [string, string, string, UsageCounter]
    if (!USAGE_COUNTERS.includes(counter)) continue
    const key = JSON.stringify([client, model, assignment])
    let cell = cells.get(key)
    if (cell === undefined) {
      cell = { hour, client, model, assignment, counts: zeroCounts() }
      cells.set(key, cell)
    }
    cell.counts[counter] += Number(value)
  }
  return [...cells.values()]
}

export interface LedgerOptions {
  /** Told of every entry recorded on this replica (the `/metrics` counters). */
  observe?: (entry: ReturnType<typeof normaliseEntry>) => void
  onError?: (err: unknown) => void
}

/** One process (embedded mode, or leases in memory): the same buffer in a Map. */
export class MemoryUsageLedger implements UsageLedger {
  /** hour → cell key → cell */
  private live = new Map<number, Map<string, UsageCell>>()
  private sealed = new Map<string, UsageBatch>()
  private sealings = 0
  /** `d:<day>` or `m:<month>` → key name → tokens (only the current windows are kept) */
  private budgets = new Map<string, Map<string, number>>()

  constructor (private readonly opts: LedgerOptions & { retentionMs?: number } = {}) {}

  async record (entry: UsageEntry): Promise<void> {
    const e = normaliseEntry(entry)
    this.opts.observe?.(e)
    const tokens = budgetTokens(e.counts)
    if (entry.budgetKey !== undefined && tokens > 0) {
      const { day, month } = budgetWindows(entry.at ?? Date.now())
      for (const window of [`d:${day}`, `m:${month}`]) {
        let used = this.budgets.get(window)
        if (used === undefined) {
          used = new Map()
          this.budgets.set(window, used)
          // a new window: older ones of its kind are over
          for (const old of this.budgets.keys()) if (old[0] === window[0] && old < window) this.budgets.delete(old)
        }
        used.set(entry.budgetKey, (used.get(entry.budgetKey) ?? 0) + tokens)
      }
    }
    let hour = this.live.get(e.hour)
    if (hour === undefined) {
      hour = new Map()
      this.live.set(e.hour, hour)
      this.forgetOld(e.hour)
    }
    // length-prefixed: no name can pose as a boundary (cheaper than a JSON array per request)
    const key = `${e.client.length}:${e.client}${e.model.length}:${e.model}${e.assignment}`
    let cell = hour.get(key)
    if (cell === undefined) {
      cell = { hour: e.hour, client: e.client, model: e.model, assignment: e.assignment, counts: zeroCounts() }
      hour.set(key, cell)
    }
    addCounts(cell.counts, e.counts)
  }

  private forgetOld (newest: number): void {
    if (this.opts.retentionMs === undefined) return
    for (const hour of this.live.keys()) {
      if (hour < newest - this.opts.retentionMs) this.live.delete(hour)
    }
  }

  async buffered (fromHour: number, to: number): Promise<BufferedUsage> {
    const live: UsageCell[] = []
    for (const [hour, cells] of this.live) {
      if (hour >= fromHour && hour < to) for (const cell of cells.values()) live.push({ ...cell, counts: { ...cell.counts } })
    }
    return { generation: this.sealings, live, batches: [...this.sealed.values()] }
  }

  async generation (): Promise<number> {
    return this.sealings
  }

  async seal (rollupId: string): Promise<void> {
    if (this.live.size === 0) return
    for (const [hour, cells] of this.live) {
      const id = `${rollupId}:${hour}`
      this.sealed.set(id, { id, hour, cells: [...cells.values()] })
    }
    this.live = new Map()
    this.sealings++
  }

  async batches (): Promise<UsageBatch[]> {
    return [...this.sealed.values()]
  }

  async drop (batchId: string): Promise<void> {
    this.sealed.delete(batchId)
  }

  async tokensUsed (keys: string[], at: number): Promise<TokensUsed[]> {
    const { day, month } = budgetWindows(at)
    const days = this.budgets.get(`d:${day}`)
    const months = this.budgets.get(`m:${month}`)
    return keys.map((k) => ({ day: days?.get(k) ?? 0, month: months?.get(k) ?? 0 }))
  }
}
