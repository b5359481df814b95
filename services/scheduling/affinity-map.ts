/**
 * The affinity map (CONTRACT 16.2): per model, prompt fingerprint → the assignment that last
 * served it and how many prompt tokens that covered. Written when an answer ends, read before a
 * lease is asked for; bounded (LRU per model, AFFINITY_ENTRIES) and expiring (AFFINITY_TTL_MS).
 * Two stores with one meaning: Redis (shared by the replicas, so every replica routes a
 * conversation's next turn alike; keys under the lease store's prefix, so a Cluster hash tag in
 * the prefix keeps them in its slot) and memory (one process). No Fastify here.
 *
 * A read is one HMGET of at most 8 fields; a write one script call (services/lua/affinity-remember-5.lua).
 * Staleness only costs a prefill, never correctness: the lease store still decides who gets what.
 *
 * What each server holds warm (`warmth`, the console's scheduling view) is counted as entries are
 * written, never by reading the map: an entry written as a request's whole prompt is a
 * conversation's leaf until the next turn writes it as a prefix (or it moves or is trimmed), and
 * the leaves per assignment are counted per model; with them, per assignment, the requests
 * routed with a fingerprint and how many of them the map had sent there (hits). A read costs
 * one counter hash per model written within AFFINITY_TTL_MS (at most WARMTH_MODELS).
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

/** What one assignment holds warm, as the affinity map counts it. */
export interface AffinityWarmth {
  /** conversations whose last prompt it served (leaf entries of the map, over every model) */
  conversations: number
  /** requests with a fingerprint it was leased for, and those of them the map had sent there */
  requests: number
  hits: number
}

/** Most models a warmth read looks at (those written last). */
export const WARMTH_MODELS = 200

export interface AffinityMap {
  /** The longest of `hashes` (shortest first) that a server of `model` holds; undefined when none. */
  lookup: (model: string, hashes: readonly string[]) => Promise<AffinityHit | undefined>
  /**
   * `assignmentId` has served these prefixes (`tokens[i]` tokens each; the whole prompt last) of
   * `model`; `hit`: the map had sent the request there.
   */
  remember: (model: string, hashes: readonly string[], tokens: readonly number[], assignmentId: string, hit?: boolean) => Promise<void>
  /** Per assignment id: what it holds warm (assignments with nothing counted are absent). */
  warmth: () => Promise<Map<string, AffinityWarmth>>
}

/** A leaf entry's value ends with this mark (the whole prompt of a request). */
const LEAF = '|L'

function warmthOf (out: Map<string, AffinityWarmth>, assignmentId: string): AffinityWarmth {
  let w = out.get(assignmentId)
  if (w === undefined) out.set(assignmentId, w = { conversations: 0, requests: 0, hits: 0 })
  return w
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
  /** per model: leaves per assignment, and when it was last written */
  private readonly leaves = new Map<string, { at: number, count: Map<string, number> }>()
  private readonly stats = new Map<string, { requests: number, hits: number }>()

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

  async remember (model: string, hashes: readonly string[], tokens: readonly number[], assignmentId: string, hit = false): Promise<void> {
    let map = this.models.get(model)
    if (map === undefined) {
      // model names come from clients: a bounded number of maps too
      if (this.models.size >= 1000) {
        const oldest = this.models.keys().next().value as string
        this.models.delete(oldest)
        this.leaves.delete(oldest)
      }
      map = new Map()
      this.models.set(model, map)
    }
    const now = Date.now()
    let leaves = this.leaves.get(model)
    if (leaves === undefined) this.leaves.set(model, leaves = { at: now, count: new Map() })
    leaves.at = now
    const count = leaves.count
    const unleaf = (value: string | undefined): void => {
      if (value === undefined || !value.endsWith(LEAF)) return
      const was = value.slice(0, value.indexOf('|'))
      const n = (count.get(was) ?? 0) - 1
      if (n > 0) count.set(was, n)
      else count.delete(was)
    }
    hashes.forEach((h, i) => {
      unleaf(map.get(h))
      map.delete(h)
      const leaf = i === hashes.length - 1
      map.set(h, `${assignmentId}|${tokens[i] ?? 0}|${now}${leaf ? LEAF : ''}`)
      if (leaf) count.set(assignmentId, (count.get(assignmentId) ?? 0) + 1)
    })
    for (const [h, value] of map) {
      if (map.size <= this.opts.entries && parse(value, now, this.opts.ttlMs) !== undefined) break
      unleaf(value)
      map.delete(h)
    }
    const stats = this.stats.get(assignmentId) ?? { requests: 0, hits: 0 }
    stats.requests++
    if (hit) stats.hits++
    this.stats.set(assignmentId, stats)
  }

  async warmth (): Promise<Map<string, AffinityWarmth>> {
    const out = new Map<string, AffinityWarmth>()
    const since = Date.now() - this.opts.ttlMs
    for (const { at, count } of this.leaves.values()) {
      // a model not written for a ttl: every entry of it has expired
      if (at <= since) continue
      for (const [a, n] of count) warmthOf(out, a).conversations += n
    }
    for (const [a, { requests, hits }] of this.stats) Object.assign(warmthOf(out, a), { requests, hits })
    return out
  }
}

type Command = (...args: unknown[]) => Promise<unknown>

/** Shared by the replicas, in the lease store's Redis. */
export class RedisAffinityMap implements AffinityMap {
  private readonly rememberScript: Command

  constructor (private readonly client: Redis | Cluster, private readonly prefix: string, private readonly opts: AffinityOptions) {
    const commands = client as unknown as Record<string, Command>
    for (const { name, numberOfKeys, lua } of loadLuaScripts(['affinity-remember-5'])) {
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

  async remember (model: string, hashes: readonly string[], tokens: readonly number[], assignmentId: string, hit = false): Promise<void> {
    if (hashes.length === 0) return
    const m = modelPart(model)
    const p = this.prefix
    const args: Array<string | number> = [Date.now(), this.opts.ttlMs, this.opts.entries, assignmentId, m, hit ? '1' : '0']
    hashes.forEach((h, i) => args.push(h, Math.round(tokens[i] ?? 0)))
    await this.rememberScript(p + 'aff:' + m, p + 'affl:' + m, p + 'affn:' + m, p + 'affm', p + 'affs', ...args)
  }

  async warmth (): Promise<Map<string, AffinityWarmth>> {
    const p = this.prefix
    const models = await this.client.zrevrangebyscore(p + 'affm', '+inf', Date.now() - this.opts.ttlMs, 'LIMIT', 0, WARMTH_MODELS)
    const pipeline = this.client.pipeline()
    for (const m of models) pipeline.hgetall(p + 'affn:' + m)
    pipeline.hgetall(p + 'affs')
    const replies = await pipeline.exec() ?? []
    const out = new Map<string, AffinityWarmth>()
    replies.forEach(([err, value], i) => {
      if (err != null) throw err
      for (const [field, n] of Object.entries(value as Record<string, string>)) {
        if (i < models.length) {
          warmthOf(out, field).conversations += Number(n) || 0
        } else {
          // '<assignment>|n' or '|h' (assignment ids hold no '|')
          const cut = field.lastIndexOf('|')
          const w = warmthOf(out, field.slice(0, cut))
          if (field.endsWith('|h')) w.hits = Number(n) || 0
          else w.requests = Number(n) || 0
        }
      }
    })
    return out
  }
}
