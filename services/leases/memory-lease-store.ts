import { randomUUID } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import type {
  AttemptInput, AttemptResult, Candidate, ChargeCorrection, Grant, HeldLease, LeaseInfo, LeaseStore, LeaseStoreOptions, Place,
  StoreEvents, StoreStatus, SweepResult
} from './lease-store.js'
import {
  DEFAULT_PRIORITY_AGING_MS, DEFAULT_QUEUE_MAX_TOTAL, PRIORITY_LEVEL, STATUS_QUEUES_LIMIT, assertSafeIds, capacityOf, fairCost,
  pinMsOf
} from './lease-store.js'

/*
 * The lease store for one replica (embedded mode): the rules of the Redis store's scripts — slots
 * per assignment, a GPU running one assignment at a time, lines per (queue, candidate list), fair
 * share and priority with aging inside a line, oldest next waiter first across lines, holds for
 * starving waiters, ttl expiry — kept in process memory. Times are monotonic (performance.now()):
 * a wall-clock step never expires or extends a lease.
 */

const LEVEL = 2 ** 40
/** Late binding (services/lua/includes/late-binding.lua): waiters looked at per line, lines per list, resident servers per model. */
const LB_WAITERS = 8
const LB_LINES = 4
const RES_MAX = 8

interface Slot { token: string, n: number, expiresAt: number }

interface LeaseRecord extends HeldLease {
  since: number
}

interface Line {
  key: string
  /** Its candidate list's key: lines of one list are served together (late binding). */
  list: string
  queue: string
  candidates: Candidate[]
  /** The GPUs of its candidates when it began (its entries in linesByGpu) */
  gpuIds?: Set<string>
  waiters: Set<WaiterRecord>
  clock: FairClock
}

/**
 * A line's fair queuing state (CONTRACT 16.4): the start tag last served, and each client's counter (its
 * last tag, corrected with the server's counts). Outlives the line's last waiter for 3 ttl from
 * its last use, as the Redis store's vt:<ln> does: a grant made at once is charged to it too.
 */
interface FairClock {
  served: number
  clients: Map<string, number>
  /** the last tag given to each client (its requests keep their arrival order) */
  lastTags: Map<string, number>
  usedAt: number
}

interface WaiterRecord {
  member: string
  line: Line
  level: number
  score: number
  /** its cost in the fair order (its tag is its start + cost) */
  cost: number
  since: number
  info: LeaseInfo
  preferred: string[]
  held?: { assignmentId: string, gpuIds: string[] }
  granted?: { token: string, index: number, expiresAt: number }
  /** Late binding: the assignment holding its prompt's prefix, until when it is pinned, from when it may not be passed over. */
  holder?: string
  pinUntil: number
  passAt?: number
}

export class MemoryLeaseStore implements LeaseStore {
  readonly kind = 'memory' as const
  readonly replicaId = randomUUID().slice(0, 12)
  private readonly opts: Required<LeaseStoreOptions>
  private readonly assignments = new Map<string, { capacity: number, gpuIds: string[] }>()
  /** Each assignment's last lease's queue, and per queue the assignments whose last lease was for it (latest last). */
  private readonly lastQueue = new Map<string, string>()
  private readonly resident = new Map<string, Map<string, true>>()
  private readonly slots = new Map<string, Map<string, Slot>>()
  private readonly owners = new Map<string, string>()
  private readonly holds = new Map<string, { member: string, expiresAt: number }>()
  private readonly leases = new Map<string, LeaseRecord>()
  private readonly lines = new Map<string, Line>()
  /** The lines with waiters by the GPUs of their candidates: a release looks at those of its GPUs only. */
  private readonly linesByGpu = new Map<string, Set<Line>>()
  private readonly waiters = new Map<string, WaiterRecord>()
  /** Each queue's waiters (across its lines). */
  private readonly queued = new Map<string, Set<WaiterRecord>>()
  private queuedTotal = 0
  private readonly listKeys = new WeakMap<Candidate[], string>()
  /** Fair clocks by line key, least recently used first (the sweep drops those idle for 3 ttl). */
  private readonly clocks = new Map<string, FairClock>()
  private events?: StoreEvents
  private fence = 0

  constructor (opts: LeaseStoreOptions) {
    this.opts = {
      ttlMs: opts.ttlMs,
      queueMax: opts.queueMax,
      queueMaxTotal: opts.queueMaxTotal ?? DEFAULT_QUEUE_MAX_TOTAL,
      starvationMs: opts.starvationMs,
      priorityAgingMs: opts.priorityAgingMs ?? DEFAULT_PRIORITY_AGING_MS,
      passOverMs: opts.passOverMs ?? 0
    }
  }

  async start (events: StoreEvents): Promise<void> {
    this.events = events
  }

  private now (): number {
    return performance.now()
  }

  /**
   * A monotonic time as wall-clock milliseconds (for display only), whole and the same at every
   * read, so the console sees no change where there was none.
   */
  private wall (t: number): number {
    return Math.round(performance.timeOrigin + t)
  }

  private used (a: string): number {
    const s = this.slots.get(a)
    if (s == null) return 0
    const now = this.now()
    let n = 0
    for (const [token, slot] of s) {
      if (slot.expiresAt <= now) {
        s.delete(token)
        this.leases.delete(token)
      } else {
        n += slot.n
      }
    }
    if (s.size === 0) this.slots.delete(a)
    return n
  }

  private holdValid (member: string): boolean {
    const w = this.waiters.get(member)
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

  private usable (a: string, member: string | undefined, want: number | 'all'): boolean {
    const def = this.assignments.get(a)
    if (def == null) return false
    const n = this.used(a)
    if (n + (want === 'all' ? def.capacity : want) > def.capacity) return false
    for (const g of def.gpuIds) {
      const o = this.owners.get(g)
      if (o != null && o !== a && this.used(o) > 0) return false
      if (member != null) {
        const h = this.holder(g)
        if (h != null && h !== member) return false
      }
    }
    return true
  }

  private want (info: LeaseInfo): number | 'all' {
    return info.purpose === 'reservation' ? 'all' : 1
  }

  private find (w: { member: string, line: Line, preferred: string[], info: LeaseInfo, held?: { assignmentId: string } }): number | undefined {
    const cands = w.line.candidates
    const want = this.want(w.info)
    const indexOf = (id: string): number => cands.findIndex((c) => c.assignmentId === id)
    for (const id of w.preferred) {
      const i = indexOf(id)
      if (i >= 0 && this.usable(id, w.member, want)) return i
    }
    if (w.held != null) {
      const i = indexOf(w.held.assignmentId)
      if (i >= 0 && this.usable(w.held.assignmentId, w.member, want)) return i
    }
    const i = cands.findIndex((c) => this.usable(c.assignmentId, w.member, want))
    return i >= 0 ? i : undefined
  }

  private take (member: string, line: Line, index: number, info: LeaseInfo): string {
    const c = line.candidates[index]
    const def = this.assignments.get(c.assignmentId) ?? { capacity: capacityOf(c), gpuIds: c.gpuIds }
    const n = info.purpose === 'reservation' ? def.capacity : 1
    const token = `${member}#${++this.fence}`
    const now = this.now()
    const expiresAt = now + this.opts.ttlMs
    let s = this.slots.get(c.assignmentId)
    if (s == null) this.slots.set(c.assignmentId, s = new Map())
    s.set(token, { token, n, expiresAt })
    for (const g of def.gpuIds) {
      this.owners.set(g, c.assignmentId)
      if (this.holds.get(g)?.member === member) this.holds.delete(g)
    }
    this.leases.set(token, {
      token, gpuIds: def.gpuIds, assignmentId: c.assignmentId, slots: n, queue: line.queue, info, since: now
    })
    this.noteResident(c.assignmentId, line.queue)
    return token
  }

  /** The assignment's last lease is for this queue: its model is resident there (as far as the store knows). */
  private noteResident (a: string, queue: string): void {
    const old = this.lastQueue.get(a)
    if (old !== undefined && old !== queue) {
      const was = this.resident.get(old)
      was?.delete(a)
      if (was?.size === 0) this.resident.delete(old)
    }
    this.lastQueue.set(a, queue)
    let set = this.resident.get(queue)
    if (set == null) this.resident.set(queue, set = new Map())
    set.delete(a)
    set.set(a, true)
  }

  /**
   * The candidates of a waiter's line whose last lease was for its queue (the RES_MAX latest), in
   * the order find takes free ones (its preferred first, then list order): their indexes.
   */
  private residentIn (w: { line: Line, preferred: string[] }): number[] {
    const set = this.resident.get(w.line.queue)
    if (set == null) return []
    const ids = [...set.keys()].slice(-RES_MAX).reverse()
    const out: Array<{ i: number, rank: number }> = []
    for (const id of ids) {
      const i = w.line.candidates.findIndex((c) => c.assignmentId === id)
      const p = w.preferred.indexOf(id)
      if (i >= 0) out.push({ i, rank: p >= 0 ? p : RES_MAX + i })
    }
    return out.sort((a, b) => a.rank - b.rank).map((x) => x.i)
  }

  /** The waiter's holder, when it is a candidate of its line and usable now: its index. */
  private holderFree (w: { member: string, line: Line, info: LeaseInfo, holder?: string }): number | undefined {
    if (w.holder === undefined || w.holder === '') return undefined
    const i = w.line.candidates.findIndex((c) => c.assignmentId === w.holder)
    return i >= 0 && this.usable(w.holder, w.member, this.want(w.info)) ? i : undefined
  }

  /** Where a request new to its line may go at once (late-binding.lua's find_new). */
  private findNew (w: { member: string, line: Line, preferred: string[], info: LeaseInfo, holder?: string, pinUntil: number }): number | undefined {
    // one candidate: whatever its holder, pin or residency, it is taken if usable and waited for if not
    if (w.line.candidates.length === 1) return this.find(w)
    const h = this.holderFree(w)
    if (h !== undefined) return h
    const pinned = w.pinUntil > this.now()
    if (pinned && this.holderInLine(w)) return undefined
    const res = this.residentIn(w)
    for (const i of res) if (this.usable(w.line.candidates[i].assignmentId, w.member, this.want(w.info))) return i
    if (pinned && res.length > 0) return undefined
    return this.spare(w) ?? this.find(w)
  }

  /** A free candidate whose taking costs no other model its last resident server (late-binding.lua's spare). */
  private spare (w: { member: string, line: Line, info: LeaseInfo }): number | undefined {
    let looked = 0
    for (const [i, c] of w.line.candidates.entries()) {
      if (!this.usable(c.assignmentId, w.member, this.want(w.info))) continue
      const q = this.lastQueue.get(c.assignmentId)
      if (q === undefined || (this.resident.get(q)?.size ?? 0) > 1) return i
      if (++looked >= RES_MAX) break
    }
    return undefined
  }

  private holderInLine (w: { line: Line, holder?: string }): boolean {
    return w.holder !== undefined && w.holder !== '' && w.line.candidates.some((c) => c.assignmentId === w.holder)
  }

  private effective (w: WaiterRecord, now: number): number {
    // one level higher for every PRIORITY_AGING_MS waited (low: normal, then high)
    const aging = this.opts.priorityAgingMs
    const up = aging > 0 ? Math.min(w.level, Math.floor((now - w.since) / aging)) : w.level
    return w.score - up * LEVEL
  }

  /** The next waiter of a line: best (effective level, tag). */
  private pick (line: Line): WaiterRecord | undefined {
    const now = this.now()
    let best: WaiterRecord | undefined
    let bestScore = Infinity
    for (const w of line.waiters) {
      const s = this.effective(w, now)
      if (s < bestScore) { best = w; bestScore = s }
    }
    return best
  }

  private unqueue (w: WaiterRecord): void {
    if (w.line.waiters.delete(w)) this.queuedTotal--
    const queued = this.queued.get(w.line.queue)
    queued?.delete(w)
    if (queued?.size === 0) this.queued.delete(w.line.queue)
    if (w.line.waiters.size === 0 && this.lines.get(w.line.key) === w.line) {
      this.lines.delete(w.line.key)
      for (const g of w.line.gpuIds ?? []) {
        const set = this.linesByGpu.get(g)
        set?.delete(w.line)
        if (set?.size === 0) this.linesByGpu.delete(g)
      }
    }
    if (w.held != null) {
      for (const g of w.held.gpuIds) if (this.holds.get(g)?.member === w.member) this.holds.delete(g)
      w.held = undefined
    }
  }

  private grantAt (w: WaiterRecord, index: number): Grant {
    const token = this.take(w.member, w.line, index, w.info)
    this.unqueue(w)
    // the clock moves on to the start of what it serves (not its end: one long request served
    // would otherwise lift every idle client past the waiters it should go between)
    const start = w.score % LEVEL - w.cost
    if (start > w.line.clock.served) w.line.clock.served = start
    w.granted = { token, index, expiresAt: this.now() + this.opts.ttlMs }
    return { member: w.member, token, candidateIndex: index }
  }

  /**
   * Serve the lines of `first`'s list, `first` being the next waiter of the first of them (late
   * binding, as late-binding.lua's serve_list): strictly `first` once it may no longer be passed
   * over; else, among the first LB_WAITERS of the first LB_LINES lines, the first whose holder is
   * free, then the first (not pinned to its holder) with a free server of its model, then the first
   * not pinned.
   */
  private serveList (first: WaiterRecord, open: Set<Line>): Grant | undefined {
    const now = this.now()
    if (first.passAt === undefined || now >= first.passAt) return this.tryGrant(first)
    const lines = [first.line, ...[...open]
      .filter((l) => l !== first.line && l.list === first.line.list)
      .map((l) => ({ l, since: this.pick(l)?.since ?? Infinity }))
      .sort((a, b) => a.since - b.since)
      .map((x) => x.l)].slice(0, LB_LINES)
    const ws: WaiterRecord[] = [first]
    for (const line of lines) {
      const order = [...line.waiters].sort((a, b) => this.effective(a, now) - this.effective(b, now)).slice(0, LB_WAITERS)
      for (const w of order) if (w !== first) ws.push(w)
    }
    for (const w of ws) {
      const i = this.holderFree(w)
      if (i !== undefined) return this.grantAt(w, i)
    }
    // what each is pinned to while its pin runs: a holder in its line, else its model's resident servers (when any)
    const pins = ws.map((w) => !(w.pinUntil > now) ? undefined : this.holderInLine(w) ? 'holder' : this.residentIn(w).length > 0 ? 'model' : undefined)
    for (const [k, w] of ws.entries()) {
      if (pins[k] === 'holder') continue
      for (const i of this.residentIn(w)) {
        if (this.usable(w.line.candidates[i].assignmentId, w.member, this.want(w.info))) return this.grantAt(w, i)
      }
    }
    const free = ws.findIndex((_, k) => pins[k] === undefined)
    if (free < 0) return undefined
    const i = this.spare(ws[free])
    return i !== undefined ? this.grantAt(ws[free], i) : this.tryGrant(ws[free])
  }

  private tryGrant (w: WaiterRecord): Grant | undefined {
    const index = this.find(w)
    const now = this.now()
    if (index != null) return this.grantAt(w, index)
    if (now - w.since >= this.opts.starvationMs) {
      for (const c of w.line.candidates.slice(0, 8)) {
        const def = this.assignments.get(c.assignmentId)
        if (def == null) continue
        if (def.gpuIds.every((g) => [undefined, w.member].includes(this.holder(g)))) {
          for (const g of def.gpuIds) this.holds.set(g, { member: w.member, expiresAt: now + this.opts.ttlMs })
          w.held = { assignmentId: c.assignmentId, gpuIds: def.gpuIds }
          break
        }
      }
    }
    return undefined
  }

  /**
   * Serve lines: the one whose next waiter arrived first goes first, until none can be served, or
   * (a release) until the GPUs it freed are taken again with no slot left: the rest of the lines
   * that could use them then cannot, and are not tried one by one.
   */
  private serve (lines: Iterable<Line>, freedGpus?: string[]): Grant[] {
    const grants: Grant[] = []
    const open = new Set(lines)
    for (;;) {
      if (freedGpus != null && freedGpus.every((g) => this.full(g))) break
      let best: WaiterRecord | undefined
      for (const line of open) {
        const w = this.pick(line)
        if (w == null) { open.delete(line); continue }
        if (best == null || w.since < best.since) best = w
      }
      if (best == null) break
      const g = this.serveList(best, open)
      if (g != null) grants.push(g)
      else for (const line of open) if (line.list === best.line.list) open.delete(line)
    }
    for (const g of grants) queueMicrotask(() => this.events?.onGrant(g))
    return grants
  }

  /** Whether the assignment running on GPU g has no free slot. */
  private full (g: string): boolean {
    const a = this.owners.get(g)
    if (a == null) return false
    const n = this.used(a)
    return n > 0 && n >= (this.assignments.get(a)?.capacity ?? 1)
  }

  /** The GPUs a line's candidates run on (as registered when the line began). */
  private gpusOf (line: Line): Set<string> {
    const out = new Set<string>()
    for (const c of line.candidates) for (const g of this.assignments.get(c.assignmentId)?.gpuIds ?? c.gpuIds) out.add(g)
    return out
  }

  /** Every line whose candidates share a GPU with these. */
  private linesUsing (gpuIds: string[]): Set<Line> {
    const out = new Set<Line>()
    for (const g of gpuIds) for (const line of this.linesByGpu.get(g) ?? []) out.add(line)
    return out
  }

  private takeGrant (member: string): { token: string, index: number } | undefined {
    const w = this.waiters.get(member)
    if (w?.granted == null) return undefined
    this.waiters.delete(member)
    return w.granted
  }

  private listKey (candidates: Candidate[]): string {
    let key = this.listKeys.get(candidates)
    if (key == null) {
      assertSafeIds(candidates)
      key = candidates.map((c) => `${c.assignmentId}=${capacityOf(c)}=${c.gpuIds.join(',')}`).join(';')
      this.listKeys.set(candidates, key)
    }
    return key
  }

  async attempt (input: AttemptInput): Promise<AttemptResult> {
    const done = this.takeGrant(input.member)
    if (done != null) return { status: 'granted', token: done.token, candidateIndex: done.index, grants: [] }
    const list = this.listKey(input.candidates)
    for (const c of input.candidates) this.assignments.set(c.assignmentId, { capacity: capacityOf(c), gpuIds: c.gpuIds })
    // a whole-assignment waiter waits in a line of its own: it must not hold up single slots
    const key = `${input.queue}\n${list}\n${input.info.purpose}`
    let w = this.waiters.get(input.member)
    if (w == null) {
      const existing = this.lines.get(key)
      const clock = this.clockOf(key, existing?.clock)
      const line: Line = existing ?? { key, list, queue: input.queue, candidates: input.candidates, waiters: new Set(), clock }
      const client = input.client ?? { id: '', priority: 'normal' }
      const pinMs = pinMsOf(input)
      const probe = {
        member: input.member,
        line,
        preferred: input.preferred ?? [],
        info: input.info,
        holder: input.holder !== undefined && input.holder !== '' ? input.holder : undefined,
        pinUntil: pinMs > 0 ? this.now() + pinMs : 0
      }
      // Nobody waits in this line: a free candidate is taken at once.
      if (existing == null && input.place == null) {
        const index = input.lateBinding === true && this.opts.passOverMs > 0 ? this.findNew(probe) : this.find(probe)
        if (index != null) {
          // served at once, charged all the same (and the line's clock moves on to its start)
          const start = this.fairTag(line.clock, client.id, input.cost) - fairCost(input.cost)
          if (start > line.clock.served) line.clock.served = start
          return { status: 'granted', token: this.take(input.member, line, index, input.info), candidateIndex: index, grants: [] }
        }
      }
      if ((this.queued.get(input.queue)?.size ?? 0) >= this.opts.queueMax) return { status: 'full', scope: 'queue', grants: [] }
      if (this.queuedTotal >= this.opts.queueMaxTotal) return { status: 'full', scope: 'total', grants: [] }
      const level = PRIORITY_LEVEL[client.priority] ?? 1
      let score = input.place?.score
      if (score == null) {
        score = level * LEVEL + this.fairTag(line.clock, client.id, input.cost)
      }
      const since = input.place?.since ?? this.now()
      w = {
        member: probe.member,
        line,
        preferred: probe.preferred,
        info: probe.info,
        holder: probe.holder,
        pinUntil: probe.pinUntil,
        level,
        score,
        cost: fairCost(input.cost),
        since,
        passAt: input.lateBinding === true && this.opts.passOverMs > 0 ? since + this.opts.passOverMs : undefined
      }
      line.waiters.add(w)
      this.queuedTotal++
      if (this.lines.get(key) !== line) {
        this.lines.set(key, line)
        line.gpuIds = this.gpusOf(line)
        for (const g of line.gpuIds) {
          let set = this.linesByGpu.get(g)
          if (set == null) this.linesByGpu.set(g, set = new Set())
          set.add(line)
        }
      }
      this.waiters.set(w.member, w)
      let queued = this.queued.get(input.queue)
      if (queued == null) this.queued.set(input.queue, queued = new Set())
      queued.add(w)
    }
    const grants = this.serve([w.line])
    const granted = this.takeGrant(input.member)
    if (granted != null) return { status: 'granted', token: granted.token, candidateIndex: granted.index, grants }
    const place: Place = { score: w.score, since: w.since }
    return { status: 'waiting', position: [...w.line.waiters].filter((o) => o.score < w.score).length, place, grants }
  }

  /** A line's fair clock (its line's, kept, or begun); now its most recently used. */
  private clockOf (key: string, current?: FairClock): FairClock {
    const clock = current ?? this.clocks.get(key) ?? { served: 0, clients: new Map(), lastTags: new Map(), usedAt: 0 }
    this.clocks.delete(key)
    clock.usedAt = this.now()
    this.clocks.set(key, clock)
    return clock
  }

  /** Start-time fair queuing: the client's counter, raised to the line's clock (idle clients bank nothing), plus the request's cost. */
  private fairTag (clock: FairClock, client: string, cost: number | undefined): number {
    const counter = Math.max(clock.served, clock.clients.get(client) ?? 0) + fairCost(cost)
    clock.clients.set(client, counter)
    // A client's own requests keep their arrival order (5.3): a credit from a correction does not
    // put this request before one of its own still in line (tag at most its last, while the clock
    // has not passed that), as in includes/queue.lua's fair_tag.
    const last = clock.lastTags.get(client) ?? 0
    const tag = last > clock.served && counter <= last ? last + 1 : counter
    clock.lastTags.set(client, tag)
    return tag
  }

  async correctCharge (correction: ChargeCorrection): Promise<void> {
    const delta = Math.round(correction.tokens) - correction.charged
    if (!Number.isFinite(delta) || delta === 0) return
    const list = this.listKeys.get(correction.candidates)
    if (list == null) return
    const clock = this.clocks.get(`${correction.queue}\n${list}\n${correction.purpose}`)
    const id = correction.client?.id ?? ''
    const counter = clock?.clients.get(id)
    if (clock == null || counter === undefined) return
    // never below zero (a counter under the clock is raised to it at the next admission anyway)
    clock.clients.set(id, Math.max(0, counter + delta))
  }

  async sweep (members: string[]): Promise<SweepResult> {
    // Expired leases free their slots lazily; serving the lines is what notices it. Records nobody
    // will look up again (grants delivered by notification, reservations left to expire) go now.
    const now = this.now()
    for (const [member, w] of this.waiters) if (w.granted != null && w.granted.expiresAt <= now) this.waiters.delete(member)
    for (const a of [...this.slots.keys()]) this.used(a)
    // fair clocks idle for 3 ttl start over (oldest use first; a line with waiters keeps its own)
    for (const [key, clock] of this.clocks) {
      if (now - clock.usedAt < 3 * this.opts.ttlMs) break
      this.clocks.delete(key)
    }
    const lines = new Set<Line>()
    for (const m of members) {
      const w = this.waiters.get(m)
      if (w != null && w.granted == null) lines.add(w.line)
    }
    this.serve(lines)
    const grants: Grant[] = []
    for (const m of members) {
      const g = this.takeGrant(m)
      if (g != null) grants.push({ member: m, token: g.token, candidateIndex: g.index })
    }
    return { grants, unknown: [] }
  }

  async leave (_queue: string, member: string): Promise<void> {
    const w = this.waiters.get(member)
    if (w == null) return
    this.waiters.delete(member)
    if (w.granted != null) {
      this.releaseToken(w.granted.token)
      return
    }
    const held = w.held?.gpuIds ?? []
    this.unqueue(w)
    if (held.length > 0) this.serve(this.linesUsing(held))
  }

  private releaseToken (token: string): number {
    const l = this.leases.get(token)
    if (l == null) return 0
    this.leases.delete(token)
    const s = this.slots.get(l.assignmentId)
    if (s?.delete(token) !== true) return 0
    if (this.used(l.assignmentId) === 0) {
      for (const g of l.gpuIds) if (this.owners.get(g) === l.assignmentId) this.owners.delete(g)
    }
    this.serve(this.linesUsing(l.gpuIds), l.gpuIds)
    return l.slots
  }

  async release (token: string): Promise<boolean> {
    return this.releaseToken(token) > 0
  }

  async releaseGpus (gpuIds: string[]): Promise<{ released: number, inFlight: string[] }> {
    // Every token first, each released once: a release serves the queues, and a GPU looked at
    // afterwards could name a reservation granted by that very release.
    const tokens = new Set<string>()
    const inFlight: string[] = []
    for (const g of gpuIds) {
      for (const token of this.tokensOn(g)) {
        if (this.leases.get(token)?.info.purpose === 'proxy') inFlight.push(g)
        else tokens.add(token)
      }
    }
    let released = 0
    for (const token of tokens) if (this.releaseToken(token) > 0) released++
    return { released, inFlight: [...new Set(inFlight)] }
  }

  private tokensOn (gpuId: string): string[] {
    const a = this.owners.get(gpuId)
    if (a == null || this.used(a) === 0) return []
    return [...(this.slots.get(a)?.keys() ?? [])]
  }

  async renew (leases: HeldLease[]): Promise<string[]> {
    const now = this.now()
    const lost: string[] = []
    for (const l of leases) {
      const slot = this.slots.get(l.assignmentId)?.get(l.token)
      const live = slot != null && slot.expiresAt > now
      const conflict = l.gpuIds.some((g) => {
        const o = this.owners.get(g)
        return o != null && o !== l.assignmentId && this.used(o) > 0
      })
      const cap = this.assignments.get(l.assignmentId)?.capacity ?? l.slots
      if (conflict || (!live && this.used(l.assignmentId) + l.slots > cap)) {
        lost.push(l.token)
        if (live) this.releaseToken(l.token)
        continue
      }
      const expiresAt = now + this.opts.ttlMs
      let s = this.slots.get(l.assignmentId)
      if (s == null) this.slots.set(l.assignmentId, s = new Map())
      s.set(l.token, { token: l.token, n: l.slots, expiresAt })
      for (const g of l.gpuIds) this.owners.set(g, l.assignmentId)
      if (!this.leases.has(l.token)) this.leases.set(l.token, { ...l, since: now })
    }
    return lost
  }

  async ping (token: string): Promise<HeldLease | undefined> {
    const l = this.leases.get(token)
    const slot = l == null ? undefined : this.slots.get(l.assignmentId)?.get(token)
    if (l == null || slot == null || slot.expiresAt <= this.now()) return undefined
    slot.expiresAt = this.now() + this.opts.ttlMs
    return { token, gpuIds: l.gpuIds, assignmentId: l.assignmentId, slots: l.slots, queue: l.queue, info: l.info }
  }

  async tokensOf (gpuIds: string[]): Promise<string[][]> {
    return gpuIds.map((g) => this.tokensOn(g))
  }

  async status (gpuIds: string[]): Promise<StoreStatus> {
    const out: StoreStatus = { gpus: [], queues: {}, queueSince: {}, holds: {} }
    for (const g of gpuIds) {
      const h = this.holder(g)
      if (h != null) out.holds[g] = h
      const a = this.owners.get(g)
      if (a == null) continue
      const used = this.used(a)
      if (used === 0) continue
      const slots = [...(this.slots.get(a)?.values() ?? [])]
      const l = this.leases.get(slots[0].token)
      out.gpus.push({
        gpuId: g,
        token: slots[0].token,
        assignmentId: a,
        model: l?.info.model,
        purpose: l?.info.purpose,
        since: l == null ? undefined : this.wall(l.since),
        expiresAt: this.wall(Math.max(...slots.map((s) => s.expiresAt))),
        slotsUsed: used,
        capacity: this.assignments.get(a)?.capacity ?? 1
      })
    }
    let n = 0
    for (const [queue, waiters] of this.queued) {
      if (n++ >= STATUS_QUEUES_LIMIT) break
      out.queues[queue] = waiters.size
      // Not simply the first added: one queued again at its old place comes later with an earlier since.
      let oldest = Infinity
      for (const w of waiters) oldest = Math.min(oldest, w.since)
      out.queueSince[queue] = this.wall(oldest)
    }
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
