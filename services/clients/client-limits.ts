/**
 * A client's limits (CONTRACT 12.3): `maxConcurrent`, `maxQueued`, `rpm` and `models`; and a key's
 * token budgets (CONTRACT 17): `tokensPerDay`, `tokensPerMonth`, read from the usage ledger's
 * counters (shared by the replicas) at admission, against the clock the limiter is given.
 *
 * Each request of a client with a numeric limit holds one token from admission to its end: a
 * `waiting` token until its lease is granted, then an `active` one. Tokens live in sets with an
 * expiry each, renewed every ttl/3 while the request lives, never in a bare counter: a request
 * whose replica dies frees its slot within one ttl, and a missed decrement cannot leak one. The
 * `rpm` window is a sorted set of admission times. Redis (Lua in `lua/client-*.lua`) shares them
 * between replicas; the memory store does the same for one process. No Fastify here.
 */
import { randomUUID } from 'node:crypto'
import type { Cluster, Redis } from 'ioredis'
import type { ClientLimits, Priority } from './api-keys.js'
import { GatewayError } from '../http/errors.js'
import { modelKey } from '../fleet/model-name.js'
import { loadLuaScripts } from '../lua/lua-scripts.js'
import { budgetWindows, type TokensUsed } from '../usage/usage-ledger.js'

/** Who a request is, as the lease engine and the limits see it. */
export interface Client {
  /** `key:<name>` for an API key, `addr:<address>` without keys, `admin` for the admin token. */
  id: string
  /** The key's name (or the address): what logs and metrics show, never a secret. */
  name: string
  priority: Priority
  limits: ClientLimits
  /** `modelKey` of each model the client may use; undefined: every model. */
  modelKeys?: ReadonlySet<string>
}

export type LimitName = 'maxConcurrent' | 'maxQueued' | 'rpm' | 'models' | 'tokensPerDay' | 'tokensPerMonth'

export type Admission =
  | { admitted: true }
  | { admitted: false, limit: CountedLimit, retryAfterMs: number }

type CountedLimit = 'maxConcurrent' | 'maxQueued' | 'rpm'

/** Where tokens and windows live: Redis for many replicas, memory for one. */
export interface ClientLimitStore {
  readonly kind: 'redis' | 'memory'
  admit: (clientId: string, token: string, limits: ClientLimits, ttlMs: number) => Promise<Admission>
  granted: (clientId: string, token: string, ttlMs: number) => Promise<void>
  release: (clientId: string, token: string) => Promise<void>
  renew: (clientId: string, tokens: string[], ttlMs: number) => Promise<void>
  /**
   * A reservation's hold (CONTRACT 18), under the lease's own token: counted as in flight, and
   * recording whose the reservation is, until released or, not renewed, it expires after `ttlMs`.
   */
  holdReservation: (clientId: string, token: string, ttlMs: number) => Promise<void>
  /** Renew the client's hold on a reservation; false when it holds none (released, expired, someone else's). */
  renewReservation: (clientId: string, token: string, ttlMs: number) => Promise<boolean>
  /** End the client's hold on a reservation (nothing when it holds none). */
  releaseReservation: (clientId: string, token: string) => Promise<void>
  /** Who holds each reservation (client id), undefined for a token nobody holds. */
  reservationHolders: (tokens: string[]) => Promise<Array<string | undefined>>
}

/** A request over one of its client's limits: 429 with Retry-After, or 403 for a model not allowed. */
export class ClientLimitError extends GatewayError {
  constructor (readonly limit: LimitName, statusCode: number, message: string, retryAfterSeconds?: number) {
    super(statusCode, message, retryAfterSeconds)
    this.name = 'ClientLimitError'
  }
}

/** One admitted request's hold on its client's limits. */
export interface Ticket {
  /** Its lease was granted: it no longer counts as waiting. */
  granted: () => void
  /** The request has ended; only the first call does anything. */
  release: () => void
}

const NO_TICKET: Ticket = { granted: () => {}, release: () => {} }

export const hasCountedLimits = (limits: ClientLimits): boolean =>
  limits.maxConcurrent != null || limits.maxQueued != null || limits.rpm != null

const LIMIT_TEXT: Record<CountedLimit, (l: ClientLimits) => string> = {
  maxConcurrent: (l) => `too many requests in flight for this API key (maxConcurrent ${String(l.maxConcurrent)})`,
  maxQueued: (l) => `too many requests waiting for this API key (maxQueued ${String(l.maxQueued)})`,
  rpm: (l) => `rate limit reached for this API key (rpm ${String(l.rpm)})`
}

interface HeldToken {
  clientId: string
  state: 'waiting' | 'active'
}

export interface ClientLimiterOptions {
  /** A token not renewed for this long is dropped (LEASE_TTL_MS: the same promise as a lease's). */
  ttlMs: number
  log?: { warn: (obj: object, msg: string) => void }
  /** Told of every refusal (metrics). */
  onRefused?: (client: Client, limit: LimitName) => void
  /** A key's tokens in the UTC day and month of `at` (the usage ledger); none: budgets are not checked. */
  tokensUsed?: (keyName: string, at: number) => Promise<TokensUsed>
  /** The budgets' clock (tests set it); default Date.now. */
  now?: () => number
}

/**
 * Admits requests against their client's limits and keeps the tokens of those admitted until
 * they end: renewed while they live, released exactly once, a failed release retried.
 */
export class ClientLimiter {
  private readonly held = new Map<string, HeldToken>()
  private readonly pendingReleases = new Map<string, string>()
  private readonly replica = randomUUID().slice(0, 8)
  private counter = 0
  private timer?: NodeJS.Timeout

  constructor (readonly store: ClientLimitStore, private readonly opts: ClientLimiterOptions) {}

  start (): void {
    this.timer = setInterval(() => { void this.renew() }, Math.max(50, Math.floor(this.opts.ttlMs / 3)))
    this.timer.unref()
  }

  /** Tokens this replica holds (tests, status). */
  inFlight (): number {
    return this.held.size
  }

  /** Whether the client may use an assignment's model (a `*` assignment serves every model, its own among them). */
  mayUse (client: Client, assignment: { modelKey: string }): boolean {
    return client.modelKeys == null || assignment.modelKey === '*' || client.modelKeys.has(assignment.modelKey)
  }

  /**
   * Whether `model` is one of the client's `models`. An alias (`target`: the model it names) is
   * allowed when the list names the alias or its target: an alias is another name of its model.
   */
  allows (client: Client, model: string, target?: string): boolean {
    return client.modelKeys == null || client.modelKeys.has(modelKey(model)) || (target !== undefined && client.modelKeys.has(modelKey(target)))
  }

  /** Checks `model` (an alias: with its `target`) against the client's `models`: 403 when it is not one of them. */
  checkModel (client: Client, model: string, target?: string): void {
    if (!this.allows(client, model, target)) {
      this.opts.onRefused?.(client, 'models')
      throw new ClientLimitError('models', 403, `this API key may not use model '${model}'`)
    }
  }

  /**
   * A key over `tokensPerDay` or `tokensPerMonth` (prompt + output tokens of its answered requests
   * in the UTC day / month) is refused with 429 until the window turns; over both, until the later
   * turns. Requests already running finish: their tokens count when they end.
   */
  async checkBudgets (client: Client): Promise<void> {
    const { tokensPerDay: perDay, tokensPerMonth: perMonth } = client.limits
    const tokensUsed = this.opts.tokensUsed
    if ((perDay == null && perMonth == null) || tokensUsed == null || !client.id.startsWith('key:')) return
    const at = (this.opts.now ?? Date.now)()
    let used: TokensUsed
    try {
      used = await tokensUsed(client.name, at)
    } catch (err) {
      this.opts.log?.warn({ err }, 'token budgets: store unavailable')
      throw new GatewayError(503, 'lease store unavailable', 1)
    }
    const windows = budgetWindows(at)
    let refusal: { limit: 'tokensPerDay' | 'tokensPerMonth', message: string, until: number } | undefined
    if (perDay != null && used.day >= perDay) {
      refusal = { limit: 'tokensPerDay', message: `token budget of this API key used up for today (tokensPerDay ${perDay}, used ${used.day})`, until: windows.dayEnd }
    }
    if (perMonth != null && used.month >= perMonth) {
      refusal = { limit: 'tokensPerMonth', message: `token budget of this API key used up for this month (tokensPerMonth ${perMonth}, used ${used.month})`, until: windows.monthEnd }
    }
    if (refusal === undefined) return
    this.opts.onRefused?.(client, refusal.limit)
    throw new ClientLimitError(refusal.limit, 429, refusal.message, Math.max(1, Math.ceil((refusal.until - at) / 1000)))
  }

  /**
   * Checks `model` against the client's `models` (403) and its counted limits (429). Answers the
   * ticket to release when the request ends. A client with no counted limit costs no store call.
   */
  async admit (client: Client, model: string, target?: string): Promise<Ticket> {
    this.checkModel(client, model, target)
    // (most clients have no budget: no await for them)
    if (client.limits.tokensPerDay != null || client.limits.tokensPerMonth != null) await this.checkBudgets(client)
    if (!hasCountedLimits(client.limits)) return NO_TICKET
    const token = `${this.replica}:${++this.counter}`
    let admission: Admission
    try {
      admission = await this.store.admit(client.id, token, client.limits, this.opts.ttlMs)
    } catch (err) {
      this.opts.log?.warn({ err }, 'client limits: store unavailable')
      throw new GatewayError(503, 'lease store unavailable', 1)
    }
    if (!admission.admitted) {
      this.opts.onRefused?.(client, admission.limit)
      throw new ClientLimitError(admission.limit, 429, LIMIT_TEXT[admission.limit](client.limits), Math.max(1, Math.ceil(admission.retryAfterMs / 1000)))
    }
    const entry: HeldToken = { clientId: client.id, state: 'waiting' }
    this.held.set(token, entry)
    return {
      granted: () => {
        if (entry.state !== 'waiting' || !this.held.has(token)) return
        entry.state = 'active'
        this.store.granted(client.id, token, this.opts.ttlMs).catch((err) => {
          // still counted as waiting until the renewal or release reaches the store
          this.opts.log?.warn({ err }, 'client limits: could not record a grant')
        })
      },
      release: () => {
        if (!this.held.delete(token)) return
        void this.releaseToken(client.id, token)
      }
    }
  }

  /*
   * Reservations (`/gpu/reserve`): admitted like a request (`admit`), then held under the lease's
   * token until released or expired. Renewed by pings only, never by this replica: the holder may
   * ping another replica, or never again.
   */

  /** The client holds the reservation `token` now (store failures are thrown). */
  async holdReservation (client: Client, token: string): Promise<void> {
    await this.store.holdReservation(client.id, token, this.opts.ttlMs)
  }

  /** A ping renewed the reservation: so is its holder's hold. False when that client holds none. */
  async renewReservation (clientId: string, token: string): Promise<boolean> {
    return await this.store.renewReservation(clientId, token, this.opts.ttlMs)
  }

  /** The reservation ended: its slot is free. A failure is logged only: the hold expires with its ttl. */
  async releaseReservation (clientId: string, token: string): Promise<void> {
    await this.store.releaseReservation(clientId, token).catch((err) => {
      this.opts.log?.warn({ err }, 'client limits: reservation release failed; it expires with its ttl')
    })
  }

  /** Whose each reservation is (client id); undefined for one nobody holds. */
  async reservationHolders (tokens: string[]): Promise<Array<string | undefined>> {
    return await this.store.reservationHolders(tokens)
  }

  private async releaseToken (clientId: string, token: string): Promise<void> {
    try {
      await this.store.release(clientId, token)
      this.pendingReleases.delete(token)
    } catch (err) {
      // its expiry frees it anyway; retried so the client need not wait for that
      this.pendingReleases.set(token, clientId)
      this.opts.log?.warn({ err }, 'client limits: release failed; will retry')
    }
  }

  /** Renew every held token, one store call per client; retry failed releases. */
  private async renew (): Promise<void> {
    for (const [token, clientId] of [...this.pendingReleases]) await this.releaseToken(clientId, token)
    const byClient = new Map<string, string[]>()
    for (const [token, { clientId }] of this.held) {
      const list = byClient.get(clientId)
      if (list == null) byClient.set(clientId, [token])
      else list.push(token)
    }
    for (const [clientId, tokens] of byClient) {
      await this.store.renew(clientId, tokens, this.opts.ttlMs).catch((err) => {
        this.opts.log?.warn({ err }, 'client limits: renewal failed')
      })
    }
  }

  close (): void {
    if (this.timer != null) clearInterval(this.timer)
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Memory                                                                                      */
/* ------------------------------------------------------------------------------------------ */

const WINDOW_MS = 60_000

interface MemoryClient {
  /** token → expiry (ms, Date.now()) */
  active: Map<string, number>
  waiting: Map<string, number>
  /** admission times, oldest first */
  window: number[]
}

/** The same rules as the Redis scripts, for one process (embedded mode). */
export class MemoryClientLimitStore implements ClientLimitStore {
  readonly kind = 'memory' as const
  private readonly clients = new Map<string, MemoryClient>()
  /** reservation token → its holder, in order of expiry (a renewal moves it to the end) */
  private readonly holders = new Map<string, { clientId: string, expiry: number }>()

  constructor (private readonly now: () => number = Date.now) {}

  private client (id: string): MemoryClient {
    let c = this.clients.get(id)
    if (c == null) {
      c = { active: new Map(), waiting: new Map(), window: [] }
      this.clients.set(id, c)
    }
    return c
  }

  private trim (id: string, now: number): MemoryClient {
    const c = this.client(id)
    for (const set of [c.active, c.waiting]) {
      for (const [token, expiry] of set) if (expiry <= now) set.delete(token)
    }
    let old = 0
    while (old < c.window.length && c.window[old] <= now - WINDOW_MS) old++
    if (old > 0) c.window.splice(0, old)
    return c
  }

  private forgetIfIdle (id: string, c: MemoryClient): void {
    if (c.active.size === 0 && c.waiting.size === 0 && c.window.length === 0) this.clients.delete(id)
  }

  async admit (clientId: string, token: string, limits: ClientLimits, ttlMs: number): Promise<Admission> {
    const now = this.now()
    const c = this.trim(clientId, now)
    try {
      if (limits.rpm != null && c.window.length >= limits.rpm) {
        const leaving = c.window[c.window.length - limits.rpm]
        return { admitted: false, limit: 'rpm', retryAfterMs: Math.max(1, leaving + WINDOW_MS - now) }
      }
      if (limits.maxConcurrent != null && c.active.size + c.waiting.size >= limits.maxConcurrent) {
        return { admitted: false, limit: 'maxConcurrent', retryAfterMs: 1000 }
      }
      if (limits.maxQueued != null && c.waiting.size >= limits.maxQueued) {
        return { admitted: false, limit: 'maxQueued', retryAfterMs: 1000 }
      }
      c.waiting.set(token, now + ttlMs)
      if (limits.rpm != null) c.window.push(now)
      return { admitted: true }
    } finally {
      this.forgetIfIdle(clientId, c)
    }
  }

  async granted (clientId: string, token: string, ttlMs: number): Promise<void> {
    const c = this.clients.get(clientId)
    if (c == null || !c.waiting.delete(token)) return
    c.active.set(token, this.now() + ttlMs)
  }

  async release (clientId: string, token: string): Promise<void> {
    const c = this.clients.get(clientId)
    if (c == null) return
    c.active.delete(token)
    c.waiting.delete(token)
    this.forgetIfIdle(clientId, c)
  }

  async renew (clientId: string, tokens: string[], ttlMs: number): Promise<void> {
    const c = this.clients.get(clientId)
    if (c == null) return
    const expiry = this.now() + ttlMs
    for (const token of tokens) {
      for (const set of [c.active, c.waiting]) if (set.has(token)) set.set(token, expiry)
    }
  }

  private holderOf (token: string): string | undefined {
    const holder = this.holders.get(token)
    return holder != null && holder.expiry > this.now() ? holder.clientId : undefined
  }

  async holdReservation (clientId: string, token: string, ttlMs: number): Promise<void> {
    const now = this.now()
    for (const [t, h] of this.holders) {
      if (h.expiry > now) break
      this.holders.delete(t)
    }
    const expiry = now + ttlMs
    this.client(clientId).active.set(token, expiry)
    this.holders.delete(token)
    this.holders.set(token, { clientId, expiry })
  }

  async renewReservation (clientId: string, token: string, ttlMs: number): Promise<boolean> {
    if (this.holderOf(token) !== clientId) return false
    await this.holdReservation(clientId, token, ttlMs)
    return true
  }

  async releaseReservation (clientId: string, token: string): Promise<void> {
    if (this.holderOf(token) !== clientId) return
    this.holders.delete(token)
    await this.release(clientId, token)
  }

  async reservationHolders (tokens: string[]): Promise<Array<string | undefined>> {
    return tokens.map((token) => this.holderOf(token))
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Redis                                                                                       */
/* ------------------------------------------------------------------------------------------ */

const SCRIPT_FILES = ['client-admit-3', 'client-granted-2', 'client-release-2', 'client-renew-2', 'client-hold-2']

type Command = (...args: Array<string | number>) => Promise<unknown>

/** Client ids carry key names and addresses: hex keeps them from acting as key separators or globs. */
const clientPart = (id: string): string => Buffer.from(id, 'utf8').toString('hex')

export class RedisClientLimitStore implements ClientLimitStore {
  readonly kind = 'redis' as const
  private readonly admitScript: Command
  private readonly grantedScript: Command
  private readonly releaseScript: Command
  private readonly renewScript: Command
  private readonly holdScript: Command

  constructor (private readonly client: Redis | Cluster, private readonly prefix: string) {
    const commands = client as unknown as Record<string, Command>
    for (const { name, numberOfKeys, lua } of loadLuaScripts(SCRIPT_FILES)) {
      if (typeof commands[name] !== 'function') client.defineCommand(name, { lua, numberOfKeys })
    }
    const bound = (name: string): Command => commands[name].bind(client)
    this.admitScript = bound('client-admit')
    this.grantedScript = bound('client-granted')
    this.releaseScript = bound('client-release')
    this.renewScript = bound('client-renew')
    this.holdScript = bound('client-hold')
  }

  private keys (clientId: string): [string, string, string] {
    const base = `${this.prefix}client:${clientPart(clientId)}:`
    return [base + 'active', base + 'waiting', base + 'window']
  }

  async admit (clientId: string, token: string, limits: ClientLimits, ttlMs: number): Promise<Admission> {
    const reply = await this.admitScript(...this.keys(clientId), token, ttlMs,
      limits.maxConcurrent ?? 0, limits.maxQueued ?? 0, limits.rpm ?? 0) as [number, string?, number?]
    if (Number(reply[0]) === 0) return { admitted: true }
    return { admitted: false, limit: reply[1] as 'rpm', retryAfterMs: Number(reply[2]) }
  }

  async granted (clientId: string, token: string, ttlMs: number): Promise<void> {
    const [active, waiting] = this.keys(clientId)
    await this.grantedScript(active, waiting, token, ttlMs)
  }

  async release (clientId: string, token: string): Promise<void> {
    const [active, waiting] = this.keys(clientId)
    await this.releaseScript(active, waiting, token)
  }

  async renew (clientId: string, tokens: string[], ttlMs: number): Promise<void> {
    const [active, waiting] = this.keys(clientId)
    await this.renewScript(active, waiting, ttlMs, ...tokens)
  }

  /** Lease tokens come back from clients (`/gpu/ping`): hex keeps them from acting as key separators or globs. */
  private holderKey (token: string): string {
    return `${this.prefix}reservation:${clientPart(token)}`
  }

  private async hold (clientId: string, token: string, ttlMs: number, op: 'hold' | 'renew' | 'release'): Promise<boolean> {
    return Number(await this.holdScript(this.keys(clientId)[0], this.holderKey(token), token, ttlMs, clientId, op)) === 1
  }

  async holdReservation (clientId: string, token: string, ttlMs: number): Promise<void> {
    await this.hold(clientId, token, ttlMs, 'hold')
  }

  async renewReservation (clientId: string, token: string, ttlMs: number): Promise<boolean> {
    return await this.hold(clientId, token, ttlMs, 'renew')
  }

  async releaseReservation (clientId: string, token: string): Promise<void> {
    await this.hold(clientId, token, 0, 'release')
  }

  async reservationHolders (tokens: string[]): Promise<Array<string | undefined>> {
    if (tokens.length === 0) return []
    const holders = await this.client.mget(...tokens.map((token) => this.holderKey(token)))
    return holders.map((holder) => holder ?? undefined)
  }
}
