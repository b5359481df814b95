import { performance } from 'node:perf_hooks'
import type { Candidate, ChargeCorrection, ClientRef, Grant, HeldLease, LeaseInfo, LeaseStore, Place } from './lease-store.js'
import { capacityOf, fairCost } from './lease-store.js'

const DONE = Promise.resolve()

/** Errors a waiting request can end with; each maps to one HTTP answer. */
export class LeaseError extends Error {
  constructor (message: string, readonly statusCode: number, readonly retryAfterSeconds?: number) {
    super(message)
    this.name = 'LeaseError'
  }
}

export interface Lease extends HeldLease {
  candidateIndex: number
  /** Time spent waiting for the lease, in milliseconds. */
  queuedMs: number
  grantedAt: number
  /** What the fair order charged its request (a request with a cost): `correctCharge` sets it right. */
  charge?: ChargeCorrection
  /**
   * Run `fn` when the lease is lost (at once if it already is): renewal found it taken by someone
   * else (it expired while we were paused), or it could not be renewed for half the ttl (it may
   * expire and be granted elsewhere). A callback, not an AbortSignal: almost no lease is ever
   * lost, and a signal per lease was a share of every request's cost.
   */
  onLost: (fn: (reason: LeaseError) => void) => void
}

/**
 * The request a waiter waits for: once it has closed (the client left), the waiter leaves the
 * queue at once. An exchange is one; `requesterOf` makes one of an AbortSignal. `onClose` runs
 * `fn` at once when it has closed already, and returns what takes `fn` back (called once the
 * waiter is settled: a long-lived requester would otherwise collect a listener per wait).
 */
export interface Requester {
  readonly closed: boolean
  onClose: (fn: () => void) => () => void
}

/** A requester that closes when `signal` aborts. */
export function requesterOf (signal: AbortSignal): Requester {
  return {
    get closed () { return signal.aborted },
    onClose: (fn) => {
      if (signal.aborted) {
        fn()
        return () => {}
      }
      signal.addEventListener('abort', fn, { once: true })
      return () => signal.removeEventListener('abort', fn)
    }
  }
}

/** A signal that aborts when the lease is lost, for work that takes one (fetch). */
export function lostSignal (lease: Lease): AbortSignal {
  const lost = new AbortController()
  lease.onLost((reason) => lost.abort(reason))
  return lost.signal
}

/** Who is told of a lease's loss, and why it was lost. */
class LeaseLoss {
  reason?: LeaseError
  private listeners?: Array<(reason: LeaseError) => void>

  on (fn: (reason: LeaseError) => void): void {
    if (this.reason != null) fn(this.reason)
    else (this.listeners ??= []).push(fn)
  }

  lose (reason: LeaseError): void {
    if (this.reason != null) return
    this.reason = reason
    for (const fn of this.listeners?.splice(0) ?? []) fn(reason)
  }
}

export interface AcquireRequest {
  queue: string
  candidates: Candidate[]
  info: LeaseInfo
  /** Fair share and priority are between clients; absent: one anonymous normal client. */
  client?: ClientRef
  /** Assignment ids that have the model loaded: tried first among the free candidates, never waited for. */
  preferred?: string[]
  /** Its cost in the fair order between clients (estimated tokens); default 1. */
  cost?: number
  /** Its close (client gone) leaves the queue at once. */
  requester?: Requester
  /** Late binding (lease-store.ts): the assignment holding its prompt's prefix. */
  holder?: string
  /** Late binding: how long it waits only for its holder or the servers with its model resident. */
  pinMs?: number
  /** Late binding: a Scheduler v3 request, which may be passed over within the store's bound. */
  lateBinding?: boolean
}

export interface LeaseManagerOptions {
  ttlMs: number
  queueTimeoutMs: number
  /** Fallback poll and heartbeat period; notifications do the real work. */
  pollMs?: number
  log?: { warn: (obj: object, msg: string) => void, error: (obj: object, msg: string) => void, info: (obj: object, msg: string) => void }
}

interface Waiter {
  member: string
  req: AcquireRequest
  startedAt: number
  /** Its place in the line once queued: a re-enqueue keeps it. */
  place?: Place
  timer?: NodeJS.Timeout
  /** Its pin's end: the store is asked again then (nothing else would serve its line at that moment). */
  pinTimer?: NodeJS.Timeout
  /** Stops listening for its client's leaving. */
  unwatch?: () => void
  /** Sent away by a shutdown (possibly while its first attempt was still running). */
  refused?: boolean
  resolve: (lease: Lease) => void
  reject: (err: Error) => void
}

const RECENT_LIMIT = 4096

/** Told about every grant, release and loss (metrics). Must not throw. */
export interface LeaseObserver {
  granted: (lease: Lease) => void
  released: (lease: Lease) => void
  /** A held lease was given up: found taken by another holder, or not renewable for half the ttl. */
  lost: (lease: Lease) => void
}

/**
 * Acquires leases for requests: one attempt on arrival (one store round trip when a GPU is free),
 * then waits for a grant notification; renews held leases; releases each lease exactly once.
 */
export class LeaseManager {
  private readonly waiters = new Map<string, Waiter>()
  /** In-flight leases; `renewedAt`: when the store last set their expiry (a call's start, to be safe). */
  private readonly held = new Map<string, { lease: Lease, loss: LeaseLoss, renewedAt: number }>()
  /**
   * Members settled recently, with the token they took (null: gave up). A second notice of that
   * grant is a duplicate; any other grant to them is an orphan and is released at once, not left
   * to expire (a sweep can pick up a grant that the member's leave then no longer finds).
   */
  private readonly settled = new Map<string, string | null>()
  /** Queue leaves that could not reach the store yet: retried, so a ghost waiter cannot block a GPU. */
  private readonly pendingLeaves = new Map<string, string>()
  /** Releases that could not reach the store yet; retried until they do. */
  private readonly pendingReleases = new Set<string>()
  /**
   * Reservations granted here, with when they were last known renewed: after the store lost its
   * data they are re-created (their holders may still be working) until they would have expired.
   */
  private readonly reservations = new Map<string, { lease: HeldLease, renewedAt: number }>()
  private counter = 0
  private sweepTimer?: NodeJS.Timeout
  private renewTimer?: NodeJS.Timeout
  private closed = false
  /** Resolves `drain()` once the last held lease is released. */
  private drained?: () => void
  /** A timed renewal is running (a store that stopped answering can hold it for commandTimeout). */
  private renewing = false
  readonly stats = { grants: 0, releases: 0, lost: 0 }

  constructor (readonly store: LeaseStore, private readonly opts: LeaseManagerOptions) {}

  async start (): Promise<void> {
    await this.store.start({
      onGrant: (g) => this.onGrant(g),
      onInventoryChanged: () => this.onInventoryChanged?.(),
      onReconnect: () => { void this.reassert() }
    })
    const pollMs = this.opts.pollMs ?? Math.min(1000, Math.floor(this.opts.ttlMs / 3))
    this.sweepTimer = setInterval(() => { void this.sweep() }, pollMs)
    this.renewTimer = setInterval(() => { void this.renewTick() }, Math.floor(this.opts.ttlMs / 3))
    this.sweepTimer.unref()
    this.renewTimer.unref()
  }

  /** Set by the owner to hear that another replica changed the inventory. */
  onInventoryChanged?: () => void

  /** Set by the owner to count grants, releases and losses. */
  observer?: LeaseObserver

  waiting (): number {
    return this.waiters.size
  }

  leases (): Lease[] {
    return [...this.held.values()].map((h) => h.lease)
  }

  async acquire (req: AcquireRequest): Promise<Lease> {
    if (this.closed) throw new LeaseError('gateway is shutting down', 503, 1)
    if (req.requester?.closed === true) throw new LeaseError('client closed request', 499)
    if (!this.store.available()) throw new LeaseError('lease store unavailable', 503, 1)
    const member = `${this.store.replicaId}|${++this.counter}`
    const startedAt = performance.now()
    const promise = new Promise<Lease>((resolve, reject) => {
      this.waiters.set(member, { member, req, startedAt, resolve, reject })
    })
    const waiter = this.waiters.get(member) as Waiter
    let result
    try {
      result = await this.store.attempt(this.attemptInput(waiter))
    } catch (err) {
      this.forget(waiter, null)
      // The call may have run in the store after all (a timeout): leave, or it stays a ghost.
      void this.leave(req.queue, member)
      this.opts.log?.warn({ err }, 'lease store attempt failed')
      throw new LeaseError('lease store unavailable', 503, 1)
    }
    for (const g of result.grants) this.onGrant(g)
    switch (result.status) {
      case 'granted':
        if (waiter.refused === true) {
          // Sent away while its first attempt ran (shutdown): the store granted it anyway, give it back.
          void this.releaseToken(result.token)
          break
        }
        this.onGrant({ member, token: result.token, candidateIndex: result.candidateIndex })
        break
      case 'full':
        this.forget(waiter, null)
        throw this.fullError(req, result.scope)
      default:
        if (this.waiters.has(member)) {
          waiter.place = result.place
          this.watch(waiter)
        } else if (!this.grantedHere(member)) {
          // Given up while the attempt was on its way (shutdown): nobody will wait in that place.
          void this.leave(req.queue, member)
        }
        // (Granted meanwhile by another call, heard before this reply: the lease is in use, and a
        // leave would release it.)
    }
    return await promise
  }

  private attemptInput (w: Waiter): Parameters<LeaseStore['attempt']>[0] {
    const { req } = w
    return {
      member: w.member,
      queue: req.queue,
      candidates: req.candidates,
      info: req.info,
      client: req.client,
      preferred: req.preferred,
      cost: req.cost,
      place: w.place,
      // one shape for every input (spreads of optional fields cost more than the rest of it)
      holder: req.holder,
      pinMs: req.pinMs,
      lateBinding: req.lateBinding
    }
  }

  private fullError (req: AcquireRequest, scope: 'queue' | 'total'): LeaseError {
    return scope === 'total'
      ? new LeaseError('too many requests are waiting for a GPU', 503, 5)
      : new LeaseError(`queue for model '${req.info.model}' is full`, 503, 5)
  }

  /** Start the timeout and the client-abort listener of a request that has to wait. */
  private watch (waiter: Waiter): void {
    const { req } = waiter
    const giveUp = (err: LeaseError): void => {
      if (!this.waiters.has(waiter.member)) return
      this.forget(waiter, null)
      waiter.reject(err)
      void this.leave(req.queue, waiter.member)
    }
    waiter.timer = setTimeout(() => {
      giveUp(new LeaseError(`timed out waiting for a GPU for model '${req.info.model}'`, 503, 5))
    }, this.opts.queueTimeoutMs)
    if (req.pinMs !== undefined && req.pinMs > 0) {
      waiter.pinTimer = setTimeout(() => { void this.requeue([waiter.member]) }, Math.ceil(req.pinMs) + 1)
    }
    // (At once when the client left while the first attempt was on its way; a no-op once settled.)
    waiter.unwatch = req.requester?.onClose(() => { if (this.waiters.has(waiter.member)) giveUp(new LeaseError('client closed request', 499)) })
  }

  private async leave (queue: string, member: string): Promise<void> {
    try {
      await this.store.leave(queue, member)
      this.pendingLeaves.delete(member)
    } catch (err) {
      this.pendingLeaves.set(member, queue)
      this.opts.log?.warn({ err }, 'leaving the queue failed; will retry')
    }
  }

  private forget (waiter: Waiter, token: string | null): void {
    this.waiters.delete(waiter.member)
    if (waiter.timer != null) clearTimeout(waiter.timer)
    if (waiter.pinTimer != null) clearTimeout(waiter.pinTimer)
    waiter.unwatch?.()
    this.settled.set(waiter.member, token)
    if (this.settled.size > RECENT_LIMIT) {
      const oldest = this.settled.keys().next().value as string
      this.settled.delete(oldest)
    }
  }

  /** The member was settled with a lease (not given up): leaving its queue would release that lease. */
  private grantedHere (member: string): boolean {
    return this.settled.get(member) != null
  }

  private onGrant (grant: Grant): void {
    if (!grant.member.startsWith(this.store.replicaId + '|')) return
    const waiter = this.waiters.get(grant.member)
    if (waiter == null) {
      // A second notice of a grant already taken; anything else is nobody's: release it now.
      if (this.held.has(grant.token) || this.settled.get(grant.member) === grant.token) return
      void this.releaseToken(grant.token)
      return
    }
    if (waiter.req.requester?.closed === true) {
      // Granted just as its client left: the lease goes straight back.
      this.forget(waiter, null)
      waiter.reject(new LeaseError('client closed request', 499))
      void this.releaseToken(grant.token)
      return
    }
    this.forget(waiter, grant.token)
    const candidate = waiter.req.candidates[grant.candidateIndex]
    const loss = new LeaseLoss()
    const now = performance.now()
    const lease: Lease = {
      token: grant.token,
      gpuIds: candidate.gpuIds,
      assignmentId: candidate.assignmentId,
      slots: waiter.req.info.purpose === 'reservation' ? capacityOf(candidate) : 1,
      queue: waiter.req.queue,
      info: waiter.req.info,
      candidateIndex: grant.candidateIndex,
      queuedMs: now - waiter.startedAt,
      grantedAt: now,
      charge: waiter.req.cost !== undefined
        ? { queue: waiter.req.queue, candidates: waiter.req.candidates, purpose: waiter.req.info.purpose, client: waiter.req.client, charged: fairCost(waiter.req.cost), tokens: 0 }
        : undefined,
      onLost: (fn) => loss.on(fn)
    }
    if (waiter.req.info.purpose === 'proxy') this.held.set(lease.token, { lease, loss, renewedAt: now })
    else this.noteReservation(lease, now)
    this.stats.grants++
    this.observer?.granted(lease)
    waiter.resolve(lease)
  }

  /** Release a lease; safe to call any number of times, only the first does anything. */
  async release (lease: Lease): Promise<void> {
    const entry = this.held.get(lease.token)
    if (entry == null) return
    this.held.delete(lease.token)
    this.stats.releases++
    this.observer?.released(lease)
    this.noteDrained()
    await this.releaseToken(lease.token)
  }

  /**
   * The answer on this lease ended and the server counted `tokens` (prompt + output): the request's
   * charge in the fair order becomes that (CONTRACT 16.4). Best effort: a failure only leaves the
   * estimate standing.
   */
  // Not async: the correction is sent with others a while later, and an async frame would keep
  // the lease (and what refers to it) alive that long, out of the young generation.
  correctCharge (lease: Lease, tokens: number): Promise<void> {
    if (lease.charge == null || !this.store.available()) return DONE
    // the lease's own record, completed (a copy per answer cost more than the correction)
    lease.charge.tokens = tokens
    // the store sends corrections in batches, one promise per batch: one handler each, not one per answer
    const sent = this.store.correctCharge(lease.charge)
    if (sent !== this.correctionBatch) {
      this.correctionBatch = sent
      this.correctionSettled = sent.catch(this.correctionFailed)
    }
    return this.correctionSettled
  }

  private correctionBatch: Promise<void> = DONE
  private correctionSettled: Promise<void> = DONE
  private readonly correctionFailed = (err: unknown): void => { this.opts.log?.warn({ err }, 'fair share: charge correction failed') }

  private noteReservation (lease: HeldLease, at: number): void {
    this.reservations.set(lease.token, { lease, renewedAt: at })
    const now = performance.now()
    for (const [token, r] of this.reservations) {
      if (now - r.renewedAt >= this.opts.ttlMs) this.reservations.delete(token)
      else break // in order of renewal
    }
  }

  /** Renew a reservation (`/gpu/ping`); undefined when it has expired. */
  async ping (token: string): Promise<HeldLease | undefined> {
    const startedAt = performance.now()
    const lease = await this.store.ping(token)
    this.reservations.delete(token)
    if (lease != null) this.noteReservation(lease, startedAt)
    return lease
  }

  /** Release a reservation (`/gpu/release`); false when it was not held. */
  async releaseReservation (token: string): Promise<boolean> {
    this.reservations.delete(token)
    return await this.store.release(token)
  }

  private noteDrained (): void {
    if (this.closed && this.held.size === 0) this.drained?.()
  }

  private async releaseToken (token: string): Promise<void> {
    try {
      await this.store.release(token)
      this.pendingReleases.delete(token)
    } catch (err) {
      // The store is unreachable; the lease's ttl frees it anyway, but retry so waiters need not wait.
      this.pendingReleases.add(token)
      this.opts.log?.warn({ err, token }, 'release failed; will retry')
    }
  }

  private async sweep (): Promise<void> {
    if (!this.store.available()) return
    try {
      for (const token of [...this.pendingReleases]) await this.releaseToken(token)
      for (const [member, queue] of [...this.pendingLeaves]) await this.leave(queue, member)
      const { grants, unknown } = await this.store.sweep([...this.waiters.keys()])
      for (const g of grants) this.onGrant(g)
      // Dropped by the store while this replica seemed dead (a network cut past the ttl): queue again.
      if (unknown.length > 0) await this.requeue(unknown)
    } catch (err) {
      this.opts.log?.warn({ err }, 'lease sweep failed')
    }
  }

  /** Renew; when that cannot be done (store unreachable, the last call still hanging), stop what may expire. */
  private async renewTick (): Promise<void> {
    if (this.renewing) {
      this.stopUnrenewed()
      return
    }
    this.renewing = true
    try {
      if (!await this.renew()) this.stopUnrenewed()
    } finally {
      this.renewing = false
    }
  }

  /** Renew every held lease (re-creating those the store forgot); false when the store could not be reached. */
  private async renew (): Promise<boolean> {
    if (!this.store.available()) return false
    const startedAt = performance.now()
    const held = [...this.held.values()]
    try {
      const lost = new Set(await this.store.renew(held.map((h) => h.lease)))
      for (const h of held) {
        if (!lost.has(h.lease.token)) h.renewedAt = Math.max(h.renewedAt, startedAt)
      }
      for (const token of lost) this.stop(token, 'lease lost to another holder; aborting its request')
      return true
    } catch (err) {
      this.opts.log?.warn({ err }, 'lease renewal failed')
      return false
    }
  }

  /**
   * A lease this replica has not renewed for half its ttl (the store unreachable from here, while
   * other replicas may still reach it) can expire and be granted elsewhere: stop its request
   * before that, so no GPU ever works for two. Checked in every renewal period (ttl/3) whose
   * renewal could not be done, so the stop comes at least ttl/6 before the expiry.
   */
  private stopUnrenewed (): void {
    const now = performance.now()
    for (const [token, h] of this.held) {
      if (now - h.renewedAt < this.opts.ttlMs / 2) continue
      this.stop(token, `lease not renewed for ${Math.round(now - h.renewedAt)} ms (lease store unreachable); stopping its request before the lease can expire`)
      // Should the store come back before the ttl, free the GPUs at once (compare-and-delete: harmless otherwise).
      this.pendingReleases.add(token)
    }
  }

  /** Abort the request of a lease this replica can no longer vouch for. */
  private stop (token: string, message: string): void {
    const entry = this.held.get(token)
    if (entry == null) return
    this.held.delete(token)
    this.stats.lost++
    this.observer?.lost(entry.lease)
    this.opts.log?.error({ token, gpus: entry.lease.gpuIds }, message)
    entry.loss.lose(new LeaseError('lease lost', 503, 1))
    this.noteDrained()
  }

  /** The store lost its data, came back, or had judged this replica dead: re-create our leases, re-take our places. */
  private async reassert (): Promise<void> {
    if (this.reasserting) return
    this.reasserting = true
    try {
      this.opts.log?.info({ leases: this.held.size, waiters: this.waiters.size }, 'lease store reconnected; re-asserting')
      await this.renew()
      await this.renewReservations()
      await this.requeue([...this.waiters.keys()])
    } finally {
      this.reasserting = false
    }
  }

  private reasserting = false

  /** Reservations granted here that have not expired yet are re-created (their holders may still work). */
  private async renewReservations (): Promise<void> {
    const now = performance.now()
    const live = [...this.reservations.values()].filter((r) => now - r.renewedAt < this.opts.ttlMs).map((r) => r.lease)
    if (live.length === 0) return
    try {
      const lost = new Set(await this.store.renew(live))
      for (const l of live) if (lost.has(l.token)) this.reservations.delete(l.token)
    } catch (err) {
      this.opts.log?.warn({ err }, 'reservation re-assert failed')
    }
  }

  /** Queue these members again at their old places (a no-op for those still queued). */
  private async requeue (members: string[]): Promise<void> {
    for (const member of members) {
      const w = this.waiters.get(member)
      // Settled meanwhile, or its first attempt still on its way: re-enqueuing would make a ghost.
      if (w == null || w.place == null) continue
      try {
        const r = await this.store.attempt(this.attemptInput(w))
        for (const g of r.grants) this.onGrant(g)
        if (r.status === 'granted') this.onGrant({ member, token: r.token, candidateIndex: r.candidateIndex })
        else if (r.status === 'full') {
          this.forget(w, null)
          w.reject(this.fullError(w.req, r.scope))
        } else if (!this.waiters.has(member) && !this.grantedHere(member)) {
          // Gave up while the call was on its way: its leave may have run first.
          void this.leave(w.req.queue, member)
        }
      } catch (err) {
        this.opts.log?.warn({ err }, 're-enqueue failed; the next sweep retries')
      }
    }
  }

  /** New requests and those still waiting get 503 and leave the queue (they can go to another replica). */
  private async refuseWaiters (): Promise<void> {
    this.closed = true
    for (const w of [...this.waiters.values()]) {
      this.forget(w, null)
      w.refused = true
      w.reject(new LeaseError('gateway is shutting down', 503, 1))
      await this.leave(w.req.queue, w.member)
    }
  }

  /** True from the start of a drain: no new lease is granted. */
  get draining (): boolean {
    return this.closed
  }

  /**
   * The first step of a shutdown: take no more requests, send the waiting ones away, and resolve
   * once every in-flight request has released its lease. Renewal goes on meanwhile.
   */
  async drain (): Promise<void> {
    await this.refuseWaiters()
    if (this.held.size === 0) return
    await new Promise<void>((resolve) => { this.drained = resolve })
  }

  /** Stop taking requests, fail the waiters, release every lease. */
  async close (): Promise<void> {
    if (this.sweepTimer != null) clearInterval(this.sweepTimer)
    if (this.renewTimer != null) clearInterval(this.renewTimer)
    await this.refuseWaiters()
    for (const { lease } of [...this.held.values()]) await this.release(lease)
    await this.store.close()
  }
}
