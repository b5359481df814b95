import type { Cluster, Redis } from 'ioredis'
import { loadLuaScripts } from '../lua/lua-scripts.js'
import {
  DAY_MS, FRACTIONAL_COUNTERS, USAGE_COUNTERS, budgetTokens, budgetWindows, cellFieldPrefix, cellsOf, normaliseEntry,
  type BufferedUsage, type LedgerOptions, type TokensUsed, type UsageBatch, type UsageEntry, type UsageLedger
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

/** What one turn of the event loop recorded, summed per field (services/lua/usage-record-1.lua's arguments). */
class PendingUsage {
  /** hour → field → [amount, fractional] */
  readonly hours = new Map<number, Map<string, [number, boolean]>>()
  /** budget key suffix → [tokens, time to live ms] */
  private readonly budgets = new Map<string, [number, number]>()
  resolve: () => void = () => {}
  readonly done = new Promise<void>((resolve) => { this.resolve = resolve })

  add (hour: number, field: string, n: number, fractional: boolean): void {
    let fields = this.hours.get(hour)
    if (fields === undefined) {
      fields = new Map()
      this.hours.set(hour, fields)
    }
    const was = fields.get(field)
    if (was === undefined) fields.set(field, [n, fractional])
    else was[0] += n
  }

  addBudget (suffix: string, tokens: number, ttlMs: number): void {
    const was = this.budgets.get(suffix)
    this.budgets.set(suffix, [(was?.[0] ?? 0) + tokens, ttlMs])
  }

  args (): Array<string | number> {
    const out: Array<string | number> = [this.hours.size]
    for (const [hour, fields] of this.hours) {
      out.push(hour, fields.size)
      for (const [field, [n, fractional]] of fields) out.push(field, n, fractional ? 'f' : 'i')
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
   * Counts the entry with the others recorded in the same turn of the event loop: one script call
   * per turn, not a transaction of a dozen commands per request (the hot path's largest cost).
   * Resolves once that call is answered.
   */
  async record (entry: UsageEntry): Promise<void> {
    let turn = this.turn
    if (turn === undefined) {
      turn = new PendingUsage()
      this.turn = turn
      setImmediate(() => { void this.flush() })
    }
    try {
      const e = normaliseEntry(entry)
      this.opts.observe?.(e)
      const prefix = cellFieldPrefix(e.client, e.model, e.assignment)
      for (const counter of USAGE_COUNTERS) {
        const n = e.counts[counter]
        if (n !== 0) turn.add(e.hour, prefix + JSON.stringify(counter) + ']', n, FRACTIONAL_COUNTERS.has(counter))
      }
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
    await turn.done
  }

  private turn: PendingUsage | undefined

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
