import type { Cluster, Redis } from 'ioredis'
import { loadLuaScripts } from '../lua/lua-scripts.js'
import {
  DAY_MS, FRACTIONAL_COUNTERS, USAGE_COUNTERS, budgetTokens, budgetWindows, cellFieldPrefix, cellsOf, normaliseEntry,
  type BufferedUsage, type LedgerOptions, type UsageCounts, type TokensUsed, type UsageBatch, type UsageEntry, type UsageLedger
} from './usage-ledger.js'

/*
 * Keys, under the gateway's prefix (on a Cluster it carries the fleet's hash tag, so the scripts'
 * keys share one slot):
 *   usage:hours        zset hour -> hour: hours with a buffer
 *   usage:h:<hour>     hash JSON [client, model, assignment, counter] -> count (HINCRBY/HINCRBYFLOAT)
 *   usage:b:<batch>    the same hash once sealed (batch = '<roll-up id>:<hour>'); usage:sealed lists them
 *   usage:generation   incremented by every seal that moved something
 *   usage:budget:d:<YYYY-MM-DD>:<key>, usage:budget:m:<YYYY-MM>:<key>
 *                      a key's prompt + output tokens in a UTC day / month (its budgets), kept a
 *                      day past the window's end (key names have no ':')
 * services/lua/usage-seal-1.lua and usage-read-1.lua read and move them atomically.
 */
const SCRIPT_FILES = ['usage-seal-1', 'usage-read-1', 'usage-record-1']

type Command = (...args: Array<string | number>) => Promise<unknown>

export interface RedisUsageLedgerOptions extends LedgerOptions {
  client: Redis | Cluster
  prefix: string
  /** Without MariaDB (nothing rolls the hours up): buffered hours expire this long after they start. */
  retentionMs?: number
}

/** Whether each of USAGE_COUNTERS (same order) counts fractions (HINCRBYFLOAT). */
const FRACTIONAL = USAGE_COUNTERS.map((c) => FRACTIONAL_COUNTERS.has(c))
/**
 * How long counts gather before they are sent: the counts reach Redis (and every replica's budgets)
 * this much later at most; a replica killed meanwhile loses them (one stopped sends them first).
 */
export const RECORD_EVERY_MS = 250
/** Cells whose field names are kept made. */
const FIELD_NAMES_KEPT = 4096

/** Flat [field, value, ...] (a script's HGETALL) as an object. */
function fieldsOf (flat: unknown): Record<string, string> {
  const out: Record<string, string> = {}
  const list = Array.isArray(flat) ? flat : []
  for (let i = 0; i + 1 < list.length; i += 2) out[String(list[i])] = String(list[i + 1])
  return out
}

/** A batch id ends with its hour: '<roll-up id>:<hour ms>'. */
function hourOfBatch (id: string): number {
  return Number(id.slice(id.lastIndexOf(':') + 1))
}

/** What a batch recorded, summed per cell (services/lua/usage-record-1.lua's arguments). */
class PendingUsage {
  /** hour → a cell's field names (RedisUsageLedger.fieldsOf: one array per cell) → its counts in USAGE_COUNTERS' order */
  readonly hours = new Map<number, Map<string[], number[]>>()
  /** budget key suffix → [tokens, time to live ms] */
  private readonly budgets = new Map<string, [number, number]>()
  resolve: () => void = () => {}
  readonly done = new Promise<void>((resolve) => { this.resolve = resolve })

  add (hour: number, fields: string[], counts: UsageCounts): void {
    let cells = this.hours.get(hour)
    if (cells === undefined) {
      cells = new Map()
      this.hours.set(hour, cells)
    }
    let sums = cells.get(fields)
    if (sums === undefined) cells.set(fields, sums = USAGE_COUNTERS.map(() => 0))
    for (let i = 0; i < USAGE_COUNTERS.length; i++) sums[i] += counts[USAGE_COUNTERS[i]]
  }

  addBudget (suffix: string, tokens: number, ttlMs: number): void {
    const was = this.budgets.get(suffix)
    this.budgets.set(suffix, [(was?.[0] ?? 0) + tokens, ttlMs])
  }

  args (): Array<string | number> {
    const out: Array<string | number> = [this.hours.size]
    for (const [hour, cells] of this.hours) {
      const at = out.length
      out.push(hour, 0)
      let n = 0
      for (const [fields, sums] of cells) {
        for (let i = 0; i < sums.length; i++) {
          if (sums[i] === 0) continue
          out.push(fields[i], sums[i], FRACTIONAL[i] ? 'f' : 'i')
          n++
        }
      }
      out[at + 1] = n
    }
    for (const [suffix, [tokens, ttlMs]] of this.budgets) out.push(suffix, tokens, ttlMs)
    return out
  }
}

/** The buffer in the lease store's Redis, shared by every replica. */
export class RedisUsageLedger implements UsageLedger {
  private readonly client: Redis | Cluster
  private readonly prefix: string
  private readonly sealScript: Command
  private readonly readScript: Command
  private readonly recordScript: Command

  constructor (private readonly opts: RedisUsageLedgerOptions) {
    this.client = opts.client
    this.prefix = opts.prefix
    const commands = opts.client as unknown as Record<string, Command>
    for (const { name, numberOfKeys, lua } of loadLuaScripts(SCRIPT_FILES)) {
      if (typeof commands[name] !== 'function') opts.client.defineCommand(name, { lua, numberOfKeys })
    }
    this.sealScript = commands['usage-seal'].bind(opts.client)
    this.readScript = commands['usage-read'].bind(opts.client)
    this.recordScript = commands['usage-record'].bind(opts.client)
  }

  private get hoursKey (): string {
    return this.prefix + 'usage:hours'
  }

  /**
   * Counts the entry with the others recorded in the next RECORD_EVERY_MS: one script call for all
   * of them, their counts summed per field (a call per request, or per turn of the event loop, was
   * the hot path's largest cost, in the gateway and in Redis). Resolves once that call is answered.
   */
  // Not async: an async frame would keep each request's entry alive until the batch is answered.
  record (entry: UsageEntry): Promise<void> {
    let turn = this.turn
    if (turn === undefined) {
      turn = new PendingUsage()
      this.turn = turn
      this.timer = setTimeout(() => { void this.flush() }, RECORD_EVERY_MS)
    }
    try {
      const e = normaliseEntry(entry)
      this.opts.observe?.(e)
      turn.add(e.hour, this.fieldsOf(e.client, e.model, e.assignment), e.counts)
      const tokens = budgetTokens(e.counts)
      if (entry.budgetKey !== undefined && tokens > 0) {
        const at = entry.at ?? Date.now()
        const w = budgetWindows(at)
        // relative expiries: right whatever clock `at` came from
        turn.addBudget(`d:${w.day}:${entry.budgetKey}`, tokens, w.dayEnd - at + DAY_MS)
        turn.addBudget(`m:${w.month}:${entry.budgetKey}`, tokens, w.monthEnd - at + DAY_MS)
      }
    } catch (err) {
      this.opts.onError?.(err)
    }
    return turn.done
  }

  private turn: PendingUsage | undefined
  private timer: NodeJS.Timeout | undefined

  /** What is still to be sent, sent now (a replica shutting down). */
  async close (): Promise<void> {
    clearTimeout(this.timer)
    await this.flush()
  }

  /** client → model → assignment → the hash fields of its counters (in USAGE_COUNTERS' order) */
  private readonly fieldNames = new Map<string, Map<string, Map<string, string[]>>>()
  private fieldNameCount = 0

  /** The fields of a cell's counters, made once per cell (a JSON array per counter and request cost more than the rest of recording it). */
  private fieldsOf (client: string, model: string, assignment: string): string[] {
    let byModel = this.fieldNames.get(client)
    if (byModel === undefined) this.fieldNames.set(client, byModel = new Map())
    let byAssignment = byModel.get(model)
    if (byAssignment === undefined) byModel.set(model, byAssignment = new Map())
    let fields = byAssignment.get(assignment)
    if (fields === undefined) {
      // many cells (many clients by address): start again rather than keep every one ever seen
      if (++this.fieldNameCount > FIELD_NAMES_KEPT) {
        this.fieldNames.clear()
        this.fieldNameCount = 0
        return this.fieldsOf(client, model, assignment)
      }
      const prefix = cellFieldPrefix(client, model, assignment)
      fields = USAGE_COUNTERS.map((counter) => prefix + JSON.stringify(counter) + ']')
      byAssignment.set(assignment, fields)
    }
    return fields
  }

  private async flush (): Promise<void> {
    const turn = this.turn
    if (turn === undefined) return
    this.turn = undefined
    try {
      await this.recordScript(this.hoursKey, this.opts.retentionMs ?? 0, Date.now(), ...turn.args())
    } catch (err) {
      this.opts.onError?.(err)
    } finally {
      turn.resolve()
    }
  }

  async buffered (fromHour: number, to: number): Promise<BufferedUsage> {
    const [generation, live, batches] = await this.readScript(this.hoursKey, fromHour, to) as [number, unknown[], unknown[]]
    const out: BufferedUsage = { generation: Number(generation), live: [], batches: [] }
    for (let i = 0; i + 1 < live.length; i += 2) out.live.push(...cellsOf(Number(live[i]), fieldsOf(live[i + 1])))
    for (let i = 0; i + 1 < batches.length; i += 2) {
      const id = String(batches[i])
      const hour = hourOfBatch(id)
      out.batches.push({ id, hour, cells: cellsOf(hour, fieldsOf(batches[i + 1])) })
    }
    return out
  }

  async generation (): Promise<number> {
    return Number(await this.client.get(this.prefix + 'usage:generation') ?? 0)
  }

  async seal (rollupId: string): Promise<void> {
    await this.sealScript(this.hoursKey, rollupId)
  }

  async batches (): Promise<UsageBatch[]> {
    const ids = await this.client.smembers(this.prefix + 'usage:sealed')
    return await Promise.all(ids.map(async (id) => {
      const hour = hourOfBatch(id)
      return { id, hour, cells: cellsOf(hour, await this.client.hgetall(`${this.prefix}usage:b:${id}`)) }
    }))
  }

  private budgetKey (window: 'd' | 'm', name: string, key: string): string {
    return `${this.prefix}usage:budget:${window}:${name}:${key}`
  }

  async tokensUsed (keys: string[], at: number): Promise<TokensUsed[]> {
    if (keys.length === 0) return []
    const { day, month } = budgetWindows(at)
    const values = await this.client.mget(...keys.flatMap((k) => [this.budgetKey('d', day, k), this.budgetKey('m', month, k)]))
    return keys.map((_, i) => ({ day: Number(values[2 * i] ?? 0), month: Number(values[2 * i + 1] ?? 0) }))
  }

  async drop (batchId: string): Promise<void> {
    const results = await this.client.multi()
      .del(`${this.prefix}usage:b:${batchId}`)
      .srem(this.prefix + 'usage:sealed', batchId)
      .exec()
    const failed = results?.find(([err]) => err != null)
    if (failed != null) throw failed[0]
  }
}
