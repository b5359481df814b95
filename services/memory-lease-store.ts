import { randomUUID } from 'node:crypto'
import type {
  AttemptInput, AttemptResult, Candidate, Grant, HeldLease, LeaseInfo, LeaseStore, LeaseStoreOptions, StoreEvents,
  StoreStatus
} from './lease-store.js'
import { assertSafeIds } from './lease-store.js'

/*
 * The lease store for one replica (embedded mode): the same rules as the Redis store's Lua
 * scripts — strict arrival order per queue, oldest head first across queues, all GPUs of a
 * candidate or none, holds for starving waiters, ttl expiry — kept in process memory.
 */

interface LeaseRecord extends HeldLease {
  since: number
  expiresAt: number
}

interface WaiterRecord {
  member: string
  queue: string
  score: number
  since: number
  candidates: Candidate[]
  info: LeaseInfo
  granted?: { token: string, index: number, expiresAt: number }
}

export class MemoryLeaseStore implements LeaseStore {
  readonly kind = 'memory' as const
  readonly replicaId = randomUUID().slice(0, 12)
  private readonly gpus = new Map<string, { token: string, expiresAt: number }>()
  private readonly holds = new Map<string, { member: string, expiresAt: number }>()
  private readonly leases = new Map<string, LeaseRecord>()
  private readonly queues = new Map<string, WaiterRecord[]>()
  private readonly waiters = new Map<string, WaiterRecord>()
  private events?: StoreEvents
  private fence = 0
  private seq = 0

  constructor (private readonly opts: LeaseStoreOptions) {}

  async start (events: StoreEvents): Promise<void> {
    this.events = events
  }

  private now (): number {
    return Date.now()
  }

  private gpuToken (gpuId: string): string | undefined {
    const g = this.gpus.get(gpuId)
    if (g == null) return undefined
    if (g.expiresAt <= this.now()) {
      this.gpus.delete(gpuId)
      return undefined
    }
    return g.token
  }

  private lease (token: string): LeaseRecord | undefined {
    const l = this.leases.get(token)
    if (l != null && l.expiresAt <= this.now()) {
      this.leases.delete(token)
      return undefined
    }
    return l
  }

  private waiter (member: string): WaiterRecord | undefined {
    const w = this.waiters.get(member)
    if (w?.granted != null && w.granted.expiresAt <= this.now()) {
      this.waiters.delete(member)
      return undefined
    }
    return w
  }

  private holdValid (member: string): boolean {
    const w = this.waiter(member)
    return w != null && w.granted == null
  }

  private holder (gpuId: string): string | undefined {
    const h = this.holds.get(gpuId)
    if (h == null) return undefined
    if (h.expiresAt <= this.now() || !this.holdValid(h.member)) {
      this.holds.delete(gpuId)
      return undefined
    }
    return h.member
  }

  private dropWaiter (queue: string, member: string): void {
    const q = this.queues.get(queue)
    if (q != null) {
      const i = q.findIndex((w) => w.member === member)
      if (i >= 0) q.splice(i, 1)
      if (q.length === 0) this.queues.delete(queue)
    }
    this.waiters.delete(member)
  }

  private tryGrant (w: WaiterRecord): boolean {
    const now = this.now()
    for (let i = 0; i < w.candidates.length; i++) {
      const c = w.candidates[i]
      const free = c.gpuIds.every((g) => this.gpuToken(g) == null && [undefined, w.member].includes(this.holder(g)))
      if (!free) continue
      const token = `${w.member}#${++this.fence}`
      const expiresAt = now + this.opts.ttlMs
      for (const g of c.gpuIds) {
        this.gpus.set(g, { token, expiresAt })
        if (this.holds.get(g)?.member === w.member) this.holds.delete(g)
      }
      this.leases.set(token, {
        token, gpuIds: c.gpuIds, assignmentId: c.assignmentId, queue: w.queue, info: w.info, since: now, expiresAt
      })
      this.dropWaiter(w.queue, w.member)
      this.waiters.set(w.member, { ...w, granted: { token, index: i, expiresAt } })
      return true
    }
    if (now - w.since >= this.opts.starvationMs) {
      for (const c of w.candidates) {
        if (c.gpuIds.every((g) => [undefined, w.member].includes(this.holder(g)))) {
          for (const g of c.gpuIds) this.holds.set(g, { member: w.member, expiresAt: now + this.opts.ttlMs })
          break
        }
      }
    }
    return false
  }

  /** Grant to queue heads, oldest arrival first across the queues, until no head can be served. */
  private serve (queues: Iterable<string>): Grant[] {
    const grants: Grant[] = []
    const blocked = new Set<string>()
    const names = [...new Set(queues)]
    for (;;) {
      let best: WaiterRecord | undefined
      for (const name of names) {
        if (blocked.has(name)) continue
        const head = this.queues.get(name)?.[0]
        if (head != null && (best == null || head.score < best.score)) best = head
      }
      if (best == null) break
      if (this.tryGrant(best)) {
        const granted = this.waiters.get(best.member)?.granted
        if (granted != null) grants.push({ member: best.member, token: granted.token, candidateIndex: granted.index })
      } else {
        blocked.add(best.queue)
      }
    }
    for (const g of grants) queueMicrotask(() => this.events?.onGrant(g))
    return grants
  }

  private queuesUsing (gpuIds: string[]): string[] {
    const out: string[] = []
    for (const [name, q] of this.queues) {
      if (q.some((w) => w.candidates.some((c) => c.gpuIds.some((g) => gpuIds.includes(g))))) out.push(name)
    }
    return out
  }

  private takeGrant (member: string): { token: string, index: number } | undefined {
    const w = this.waiter(member)
    if (w?.granted == null) return undefined
    this.waiters.delete(member)
    return w.granted
  }

  async attempt (input: AttemptInput): Promise<AttemptResult> {
    assertSafeIds(input.candidates)
    const epoch = 'memory'
    const done = this.takeGrant(input.member)
    if (done != null) return { status: 'granted', epoch, token: done.token, candidateIndex: done.index, grants: [] }
    let w = this.waiter(input.member)
    if (w == null) {
      const q = this.queues.get(input.queue) ?? []
      const now = this.now()
      w = {
        member: input.member,
        queue: input.queue,
        score: input.score ?? now * 1024 + (++this.seq % 1024),
        since: now,
        candidates: input.candidates,
        info: input.info
      }
      // Nobody waits for this model: a free candidate is taken at once (QUEUE_MAX bounds waiting only).
      if (q.length === 0 && this.tryGrant(w)) {
        const taken = this.takeGrant(w.member)
        if (taken != null) return { status: 'granted', epoch, token: taken.token, candidateIndex: taken.index, grants: [] }
      }
      if (q.length >= this.opts.queueMax) return { status: 'full', epoch, grants: [] }
      q.push(w)
      q.sort((a, b) => a.score - b.score)
      this.queues.set(input.queue, q)
      this.waiters.set(w.member, w)
    }
    const grants = this.serve([input.queue])
    const granted = this.takeGrant(input.member)
    if (granted != null) {
      return { status: 'granted', epoch, token: granted.token, candidateIndex: granted.index, grants }
    }
    const position = this.queues.get(input.queue)?.indexOf(w) ?? 0
    return { status: 'waiting', epoch, position, score: w.score, grants }
  }

  async sweep (queues: string[], members: string[]): Promise<Grant[]> {
    // Expired leases free their GPUs lazily; serving the queues is what notices it. Records nobody
    // will look up again (grants delivered by notification, reservations left to expire) go now.
    const now = this.now()
    for (const [member, w] of this.waiters) if (w.granted != null && w.granted.expiresAt <= now) this.waiters.delete(member)
    for (const [token, l] of this.leases) if (l.expiresAt <= now) this.leases.delete(token)
    this.serve(queues)
    const grants: Grant[] = []
    for (const m of members) {
      const g = this.takeGrant(m)
      if (g != null) grants.push({ member: m, token: g.token, candidateIndex: g.index })
    }
    return grants
  }

  async leave (queue: string, member: string): Promise<void> {
    const token = this.waiter(member)?.granted?.token
    this.dropWaiter(queue, member)
    if (token != null) this.releaseToken(token, [])
    this.serve([queue])
  }

  private releaseToken (token: string, gpuList: string[]): number {
    const gpuIds = this.lease(token)?.gpuIds ?? gpuList
    let n = 0
    for (const g of gpuIds) {
      if (this.gpuToken(g) === token) {
        this.gpus.delete(g)
        n++
      }
    }
    this.leases.delete(token)
    if (n > 0) this.serve(this.queuesUsing(gpuIds))
    return n
  }

  async release (token: string, gpuIds: string[] = []): Promise<boolean> {
    return this.releaseToken(token, gpuIds) > 0
  }

  async releaseGpus (gpuIds: string[]): Promise<number> {
    let n = 0
    for (const g of gpuIds) {
      const token = this.gpuToken(g)
      if (token != null && this.lease(token)?.info.purpose !== 'proxy') n += this.releaseToken(token, [g])
    }
    return n
  }

  async renew (leases: HeldLease[]): Promise<string[]> {
    const now = this.now()
    const lost: string[] = []
    for (const l of leases) {
      const mine = l.gpuIds.every((g) => [undefined, l.token].includes(this.gpuToken(g)))
      if (!mine) {
        lost.push(l.token)
        continue
      }
      const expiresAt = now + this.opts.ttlMs
      for (const g of l.gpuIds) this.gpus.set(g, { token: l.token, expiresAt })
      const existing = this.lease(l.token)
      this.leases.set(l.token, { ...l, since: existing?.since ?? now, expiresAt })
    }
    return lost
  }

  async ping (token: string): Promise<HeldLease | undefined> {
    const l = this.lease(token)
    if (l == null || !l.gpuIds.every((g) => this.gpuToken(g) === token)) return undefined
    l.expiresAt = this.now() + this.opts.ttlMs
    for (const g of l.gpuIds) this.gpus.set(g, { token, expiresAt: l.expiresAt })
    return { token, gpuIds: l.gpuIds, assignmentId: l.assignmentId, queue: l.queue, info: l.info }
  }

  async tokensOf (gpuIds: string[]): Promise<Array<string | undefined>> {
    return gpuIds.map((g) => this.gpuToken(g))
  }

  async status (gpuIds: string[]): Promise<StoreStatus> {
    const out: StoreStatus = { gpus: [], queues: {}, holds: {} }
    for (const g of gpuIds) {
      const h = this.holder(g)
      if (h != null) out.holds[g] = h
      const token = this.gpuToken(g)
      if (token == null) continue
      const l = this.lease(token)
      out.gpus.push({
        gpuId: g,
        token,
        assignmentId: l?.assignmentId,
        model: l?.info.model,
        purpose: l?.info.purpose,
        since: l?.since,
        expiresAt: this.gpus.get(g)?.expiresAt
      })
    }
    for (const [name, q] of this.queues) out.queues[name] = q.length
    return out
  }

  async publishInventoryChanged (): Promise<void> {
    queueMicrotask(() => this.events?.onInventoryChanged())
  }

  available (): boolean {
    return true
  }

  async close (): Promise<void> {}
}
