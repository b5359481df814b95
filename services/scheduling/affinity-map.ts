/**
 * The affinity map (CONTRACT 16.2): per model, prompt fingerprint → the assignment that last
 * served it and how many prompt tokens that covered. Written when an answer ends, read before a
 * lease is asked for; bounded (LRU per model, AFFINITY_ENTRIES) and expiring (AFFINITY_TTL_MS).
 * Two stores with one meaning: Redis (shared by the replicas, so every replica routes a
 * conversation's next turn alike; keys under the lease store's prefix, so a Cluster hash tag in
 * the prefix keeps them in its slot) and memory (one process). No Fastify here.
 *
 * A read is one HMGET of at most 8 fields; a write one script call (services/lua/affinity-remember-2.lua).
 * Staleness only costs a prefill, never correctness: the lease store still decides who gets what.
 */
import type { Cluster, Redis } from 'ioredis'
import { loadLuaScripts } from '../lua/lua-scripts.js'

export interface AffinityHit {
  assignmentId: string
  /** Estimated prompt tokens the matched prefix covers. */
  tokens: number
  /** Which of the looked-up hashes matched. */
  index: number
}

export interface AffinityOptions {
  /** Entries kept per model (AFFINITY_ENTRIES). */
  entries: number
  /** How long an entry lives after its last write (AFFINITY_TTL_MS). */
  ttlMs: number
}

export interface AffinityMap {
  /** The longest of `hashes` (shortest first) that a server of `model` holds; undefined when none. */
  lookup: (model: string, hashes: readonly string[]) => Promise<AffinityHit | undefined>
  /** `assignmentId` has served these prefixes (`tokens[i]` tokens each) of `model`. */
  remember: (model: string, hashes: readonly string[], tokens: readonly number[], assignmentId: string) => Promise<void>
}

/** Model names come from clients: hex keeps them from acting as key separators or globs. */
const modelPart = (model: string): string => Buffer.from(model, 'utf8').toString('hex')

function parse (value: string | null | undefined, now: number, ttlMs: number, index = 0): AffinityHit | undefined {
  if (value == null) return undefined
  const [assignmentId, tokens, at] = value.split('|')
  if (assignmentId === undefined || !(Number(at) > now - ttlMs)) return undefined
  return { assignmentId, tokens: Number(tokens) || 0, index }
}

/** In process (embedded mode, or no Redis): Map insertion order is the LRU order. */
export class MemoryAffinityMap implements AffinityMap {
  private readonly models = new Map<string, Map<string, string>>()

  constructor (private readonly opts: AffinityOptions) {}

  async lookup (model: string, hashes: readonly string[]): Promise<AffinityHit | undefined> {
    const map = this.models.get(model)
    if (map === undefined) return undefined
    const now = Date.now()
    for (let i = hashes.length - 1; i >= 0; i--) {
      const hit = parse(map.get(hashes[i]), now, this.opts.ttlMs, i)
      if (hit !== undefined) return hit
    }
    return undefined
  }

  async remember (model: string, hashes: readonly string[], tokens: readonly number[], assignmentId: string): Promise<void> {
    let map = this.models.get(model)
    if (map === undefined) {
      // model names come from clients: a bounded number of maps too
      if (this.models.size >= 1000) this.models.delete(this.models.keys().next().value as string)
      map = new Map()
      this.models.set(model, map)
    }
    const now = Date.now()
    hashes.forEach((h, i) => {
      map.delete(h)
      map.set(h, `${assignmentId}|${tokens[i] ?? 0}|${now}`)
    })
    for (const [h, value] of map) {
      if (map.size <= this.opts.entries && parse(value, now, this.opts.ttlMs) !== undefined) break
      map.delete(h)
    }
  }
}

type Command = (...args: unknown[]) => Promise<unknown>

/** Shared by the replicas, in the lease store's Redis. */
export class RedisAffinityMap implements AffinityMap {
  private readonly rememberScript: Command

  constructor (private readonly client: Redis | Cluster, private readonly prefix: string, private readonly opts: AffinityOptions) {
    const commands = client as unknown as Record<string, Command>
    for (const { name, numberOfKeys, lua } of loadLuaScripts(['affinity-remember-2'])) {
      if (typeof commands[name] !== 'function') client.defineCommand(name, { lua, numberOfKeys })
    }
    this.rememberScript = commands['affinity-remember'].bind(client)
  }

  async lookup (model: string, hashes: readonly string[]): Promise<AffinityHit | undefined> {
    if (hashes.length === 0) return undefined
    const values = await this.client.hmget(this.prefix + 'aff:' + modelPart(model), ...hashes)
    const now = Date.now()
    for (let i = values.length - 1; i >= 0; i--) {
      const hit = parse(values[i], now, this.opts.ttlMs, i)
      if (hit !== undefined) return hit
    }
    return undefined
  }

  async remember (model: string, hashes: readonly string[], tokens: readonly number[], assignmentId: string): Promise<void> {
    if (hashes.length === 0) return
    const m = modelPart(model)
    const args: Array<string | number> = [Date.now(), this.opts.ttlMs, this.opts.entries, assignmentId]
    hashes.forEach((h, i) => args.push(h, Math.round(tokens[i] ?? 0)))
    await this.rememberScript(this.prefix + 'aff:' + m, this.prefix + 'affl:' + m, ...args)
  }
}
