import { createHash, randomUUID } from 'node:crypto'
import type { Cluster, Redis } from 'ioredis'
import type {
  AttemptInput, AttemptResult, Candidate, ChargeCorrection, Grant, HeldLease, LeaseInfo, LeaseStore, LeaseStoreOptions, Place,
  StoreEvents, StoreStatus, SweepResult
} from './lease-store.js'
import {
  DEFAULT_PRIORITY_AGING_MS, DEFAULT_QUEUE_MAX_TOTAL, PRIORITY_LEVEL, STATUS_QUEUES_LIMIT, assertSafeIds, capacityOf, fairCost,
  pinMsOf
} from './lease-store.js'
import { loadLuaScripts } from '../lua/lua-scripts.js'

/*
 * Key layout (every key starts with the configured prefix P; the scripts declare KEYS[1] =
 * P..'epoch' and derive P from it, so that a Cluster hash tag in P keeps every key in one slot).
 * Ids in keys are checked against SAFE_ID; queue names are hex; list ids and client ids are hashes.
 *
 *   epoch = '<uuid>@<created ms>'   store generation (gone: data lost)    run = Redis run id seen
 *   pause (PX)                      grants held while lost leases are re-asserted
 *   fence                           lease counter                         replica:<id> (PX) heartbeat
 *   asg:<a>    hash cap, gpus       an assignment as last registered
 *   slots:<a>  zset token->expiry   its live leases (a reservation: token, token/2 ... token/cap)
 *   gpu:<g>    = a (PX)             the assignment running on a GPU (any number of its slots)
 *   hold:<g>   = member (PX)        GPU kept free for a starving waiter
 *   expiry     zset a->expiry       earliest slot expiry per assignment: expired slots found at once
 *   lease:<t>  hash (PX)            gpus, assignment, n, queue, model, kind, purpose, since
 *   rel:<t>    (PX)                 released: a late renewal never revives it
 *   list:<l>   hash pos->a, n       a candidate list by content hash (PX a day, refreshed on use)
 *   lpos:<l>   hash a->pos           free:<l> zset pos->pos: its candidates that may be free
 *   alist:<a>  set of l             lists holding a
 *   pk:<g>     set of '<pos>:<l>'   free-index entries parked while another assignment runs on g
 *   gw:<g>     zset l->arrival      lists that found g in their way, by next waiter (lower bound)
 *   lines:<l>  zset ln->arrival     lines of list l with waiters, by their next waiter's arrival
 *   line:<ln>  zset m->level*2^40+tag   age1:<ln>, age2:<ln> zset m->arrival (normal, low)
 *   vt:<ln>    hash v, c<client>, l<client>, x   fair queuing: v the start tag last served, c a client's counter, l its last tag, x when its expiry was last set
 *                                   (ln = '<l>:<queue>:<1|all>'; PX 3 ttl; fair-correct-1.lua sets c right)
 *   w:<m>      hash (PX)            a waiter: line, list, queue, level, score, since, ...; token once granted
 *   qw:<queue> zset m->expiry       a model's waiters (QUEUE_MAX); allw: every waiter (QUEUE_MAX_TOTAL)
 *   qa:<queue> zset m->arrival      the same waiters by arrival: the status's oldest wait (PX as qw:)
 *   queues     zset queue->touched  models with waiters, for the status
 *   res:<queue> zset a->last take   the assignments whose last lease was for that queue (late
 *                                   binding: the model resident there; asg:<a> field q names it)
 * Channel P..'events': `g|member|token|index` for a grant to another replica's waiter, `i` for an
 * inventory change. Every script that grants returns its grants in its reply; the store hands
 * those of its own replica's waiters on at once (no pub/sub hop between a release and the next
 * request on the freed GPUs).
 *
 * Cost: an attempt, release and grant read the heads of indexes (free candidates of a list, lines
 * of a list, waiters of a line, lists waiting for a GPU): nothing scans the candidates, the queues,
 * the waiters or the assignments sharing a GPU (services/lua/includes/slots.lua, at the top).
 * Late binding (services/lua/includes/late-binding.lua) reads at most 32 waiters and 8 resident
 * servers per queue of a list it serves.
 */
const SCRIPT_FILES = ['attempt-1', 'register-1', 'sweep-1', 'leave-1', 'release-1', 'release-gpus-1', 'renew-1', 'ping-1', 'status-1', 'fair-correct-1']
/** Read once, when the first Redis store is made (embedded mode never needs them). */
let scripts: ReturnType<typeof loadLuaScripts> | undefined

type ScriptName = 'attempt' | 'register' | 'sweep' | 'leave' | 'release' | 'releaseGpus' | 'renew' | 'ping' | 'status' | 'fairCorrect'
const COMMAND: Record<ScriptName, string> = {
  attempt: 'maestroAttempt',
  register: 'maestroRegister',
  sweep: 'maestroSweep',
  leave: 'maestroLeave',
  release: 'maestroRelease',
  releaseGpus: 'maestroReleaseGpus',
  renew: 'maestroRenew',
  ping: 'maestroPing',
  status: 'maestroStatus',
  fairCorrect: 'maestroFairCorrect'
}


/** Charge corrections wait at most this long to be sent with others, at most this many a call (services/lua/fair-correct-1.lua). */
const CORRECTIONS_EVERY_MS = 50
const DONE = Promise.resolve()
const CORRECTIONS_PER_CALL = 64

export interface RedisLeaseStoreOptions extends LeaseStoreOptions {
  /** Commands; made to fail fast while disconnected so no request waits on a dead store. */
  client: Redis | Cluster
  /** A second connection for pub/sub (a subscribed connection can run nothing else). */
  subscriber: Redis | Cluster
  prefix: string
  replicaId?: string
}

interface ListRef {
  id: string
  encoded: string
}

interface Reply {
  body: unknown[]
  grants: Grant[]
}

function parseGrants (flat: unknown[], from: number): Grant[] {
  const grants: Grant[] = []
  for (let i = from; i + 2 < flat.length; i += 3) {
    grants.push({ member: String(flat[i]), token: String(flat[i + 1]), candidateIndex: Number(flat[i + 2]) })
  }
  return grants
}

/** Client ids come from outside (API key names, addresses): hashed before they reach a key or field. */
function clientField (id: string): string {
  let field = clientFields.get(id)
  if (field === undefined) {
    field = createHash('sha1').update(id).digest('hex').slice(0, 16)
    // A few clients make most requests: remember the last ones, not every address ever seen.
    if (clientFields.size >= CLIENT_FIELDS_KEPT) clientFields.clear()
    clientFields.set(id, field)
  }
  return field
}
const CLIENT_FIELDS_KEPT = 1024
const clientFields = new Map<string, string>()

/**
 * Calls made in one turn of the event loop: the first goes out at once (it may hand a GPU on, or
 * start a request on an idle fleet: it must not wait for the turn to end), those after it in the
 * same turn together at its end (setImmediate: once the sockets read in this turn have all been
 * handled), in one socket write instead of one each.
 */
class TurnBatch<T, R> {
  private open = false
  private readonly queued: Array<{ item: T, resolve: (r: R | Promise<R>) => void, reject: (err: unknown) => void }> = []

  /** `one` sends a call alone; `many` sends several at once and answers each (an answer may be a rejection). */
  constructor (private readonly one: (item: T) => Promise<R>, private readonly many: (items: T[]) => Promise<Array<R | Promise<R>>>) {}

  async call (item: T): Promise<R> {
    if (this.open) return await new Promise<R>((resolve, reject) => { this.queued.push({ item, resolve, reject }) })
    this.open = true
    setImmediate(this.flush)
    return await this.one(item)
  }

  private readonly flush = (): void => {
    this.open = false
    const batch = this.queued.splice(0)
    if (batch.length === 0) return
    this.many(batch.map((b) => b.item)).then((answers) => {
      batch.forEach((b, i) => b.resolve(answers[i]))
    }, (err: unknown) => {
      for (const b of batch) b.reject(err)
    })
  }
}

export class RedisLeaseStore implements LeaseStore {
  readonly kind = 'redis' as const
  readonly replicaId: string
  private readonly client: (Redis | Cluster) & Record<string, (...args: Array<string | number>) => Promise<unknown[]>>
  private readonly subscriber: Redis | Cluster
  private readonly prefix: string
  private readonly opts: Required<LeaseStoreOptions>
  private knownEpoch = ''
  private knownRun = ''
  private events?: StoreEvents
  private wasReady = false
  /** Candidate lists by array (the inventory hands out the same array for a model while it lasts). */
  private readonly lists = new WeakMap<Candidate[], ListRef>()
  /** This replica's waiting members and their lines (their sweep keeps those alive). */
  private readonly lineOf = new Map<string, string>()
  /** Charge corrections waiting to be sent (correctCharge), and their sending. */
  private corrections?: { deltas: Map<string, number>, sent: Promise<void> }
  /** Releases: those of one turn after the first share one script call. */
  private readonly releases = new TurnBatch<string, boolean>(
    async (token) => (await this.releaseTokens([token]))[0],
    async (tokens) => await this.releaseTokens(tokens))

  /** Attempts: those of one turn after the first share one script call. */
  private readonly attempts = new TurnBatch<Array<string | number>, Reply>(
    async (args) => (await this.attemptAll([args]))[0],
    async (batch) => await this.attemptAll(batch))

  constructor (opts: RedisLeaseStoreOptions) {
    this.client = opts.client as RedisLeaseStore['client']
    this.subscriber = opts.subscriber
    this.prefix = opts.prefix
    this.opts = {
      ttlMs: opts.ttlMs,
      queueMax: opts.queueMax,
      queueMaxTotal: opts.queueMaxTotal ?? DEFAULT_QUEUE_MAX_TOTAL,
      starvationMs: opts.starvationMs,
      priorityAgingMs: opts.priorityAgingMs ?? DEFAULT_PRIORITY_AGING_MS,
      passOverMs: opts.passOverMs ?? 0
    }
    this.replicaId = opts.replicaId ?? randomUUID().slice(0, 12)
    scripts ??= loadLuaScripts(SCRIPT_FILES)
    for (const script of scripts) {
      const name = COMMAND[script.name.replace(/-(\w)/g, (_, c: string) => c.toUpperCase()) as ScriptName]
      if (typeof this.client[name] !== 'function') {
        this.client.defineCommand(name, { numberOfKeys: script.numberOfKeys, lua: script.lua })
      }
    }
  }

  private get channel (): string {
    return this.prefix + 'events'
  }

  async start (events: StoreEvents): Promise<void> {
    this.events = events
    this.subscriber.on('message', (channel: string, message: string) => {
      if (channel !== this.channel) return
      if (message === 'i') {
        events.onInventoryChanged()
        return
      }
      // `g|<replica>|<n>|<replica>|<n>#<fence>|<index>`: member and token both contain a `|`
      const parts = message.split('|')
      if (parts[0] === 'g' && parts[1] === this.replicaId && parts.length === 6) {
        events.onGrant({
          member: `${parts[1]}|${parts[2]}`, token: `${parts[3]}|${parts[4]}`, candidateIndex: Number(parts[5])
        })
      }
    })
    // Forget the run id as soon as the connection is lost, not only at 'ready': ioredis emits
    // 'ready' a tick after the status turns ready, and a script sent in that tick with the old run
    // id would skip the check on a promoted replica and hand the old id back (no pause after a failover).
    this.client.on('close', () => { this.knownRun = '' })
    this.client.on('ready', () => {
      // A new connection may reach a restarted Redis (whose data, run id key included, may come
      // from a snapshot): the next script compares the stored run id with the server's own.
      this.knownRun = ''
      // ioredis resends nothing for us after a reconnect: let the manager re-assert its state.
      if (this.wasReady) events.onReconnect()
      this.wasReady = true
    })
    if (this.client.status === 'ready') this.wasReady = true
    await this.subscriber.subscribe(this.channel)
    await this.sweep([])
  }

  /** The arguments every script starts with (includes/prelude.lua). */
  private commonArgs (): Array<string | number> {
    const o = this.opts
    return [this.prefix + 'epoch', o.ttlMs, o.starvationMs, this.replicaId, this.knownEpoch, randomUUID(), this.knownRun, o.priorityAgingMs]
  }

  /** Run a script: the common arguments first; the reply's header tells of a lost store or a lost heartbeat. */
  private async run (name: ScriptName, ...args: Array<string | number>): Promise<Reply> {
    return this.readReply(await this.client[COMMAND[name]](...this.commonArgs(), ...args))
  }

  private readReply (r: unknown[]): Reply {
    const epoch = String(r[0])
    if (r[1] !== '' && r[1] != null) this.knownRun = String(r[1])
    const n = Number(r[3])
    const reply = { body: r.slice(4, 4 + n), grants: parseGrants(r, 4 + n) }
    if (epoch === '') return reply // status: no epoch check
    const lost = this.knownEpoch !== '' && epoch !== this.knownEpoch
    this.knownEpoch = epoch
    if (lost || String(r[2]).includes('h')) this.events?.onReconnect()
    return reply
  }

  private listOf (candidates: Candidate[]): ListRef {
    let ref = this.lists.get(candidates)
    if (ref == null) {
      assertSafeIds(candidates)
      const encoded = candidates.map((c) => `${c.assignmentId}=${capacityOf(c)}=${c.gpuIds.join(',')}`).join(';')
      ref = { id: createHash('sha1').update(encoded).digest('hex').slice(0, 24), encoded }
      this.lists.set(candidates, ref)
    }
    return ref
  }

  async attempt (input: AttemptInput): Promise<AttemptResult> {
    const list = this.listOf(input.candidates)
    const client = input.client ?? { id: '', priority: 'normal' }
    const want = input.info.purpose === 'reservation' ? 'all' : '1'
    const args = [
      input.member, input.queue, list.id, input.info.model, input.info.kind, input.info.purpose,
      this.opts.queueMax, this.opts.queueMaxTotal, input.place?.score ?? '', input.place?.since ?? '',
      clientField(client.id), PRIORITY_LEVEL[client.priority] ?? 1, (input.preferred ?? []).join(','),
      want, fairCost(input.cost),
      input.holder ?? '', pinMsOf(input), input.lateBinding === true ? this.opts.passOverMs : 0,
      input.candidates.length
    ]
    let r = await this.attempts.call(args)
    if (r.body[0] === 'list') {
      // First use of this list (or the store lost it): register it once, then try again.
      await this.run('register', list.id, list.encoded)
      r = (await this.attemptAll([args]))[0]
    }
    this.deliver(r.grants)
    const b = r.body
    switch (b[0]) {
      case 'granted':
        return { status: 'granted', token: String(b[1]), candidateIndex: Number(b[2]), grants: r.grants }
      case 'waiting':
      case 'paused': {
        this.lineOf.set(input.member, `${list.id}:${input.queue}:${want}`)
        const place: Place = b[0] === 'waiting'
          ? { score: Number(b[2]), since: Number(b[3]) }
          : { score: Number(b[1]), since: Number(b[2]) }
        return b[0] === 'waiting'
          ? { status: 'waiting', position: Number(b[1]), place, grants: r.grants }
          : { status: 'paused', place, grants: r.grants }
      }
      case 'full':
        return { status: 'full', scope: b[1] === 'total' ? 'total' : 'queue', grants: r.grants }
      default:
        throw new Error(`lease store: unexpected attempt reply ${String(b[0])}`)
    }
  }

  /**
   * Corrections are summed per client counter and sent together, CORRECTIONS_EVERY_MS after the
   * first of them, in one script call per CORRECTIONS_PER_CALL counters: one call per answer cost
   * bench (a) a script call per request; a counter matters only at its client's next admission.
   */
  // (not async: the promise of the batch is shared, one per request would be garbage)
  correctCharge (correction: ChargeCorrection): Promise<void> {
    const delta = Math.round(correction.tokens) - correction.charged
    if (!Number.isFinite(delta) || delta === 0) return DONE
    // the line the request was admitted to, as attempt names it (a list this replica never registered had no line here)
    const list = this.lists.get(correction.candidates)
    if (list == null) return DONE
    const counter = `${list.id}:${correction.queue}:${correction.purpose === 'reservation' ? 'all' : '1'}\nc${clientField(correction.client?.id ?? '')}`
    let pending = this.corrections
    if (pending == null) {
      const deltas = new Map<string, number>()
      const due = new Promise((resolve) => { setTimeout(resolve, CORRECTIONS_EVERY_MS).unref() })
      pending = this.corrections = { deltas, sent: due.then(async () => await this.sendCorrections(deltas)) }
    }
    pending.deltas.set(counter, (pending.deltas.get(counter) ?? 0) + delta)
    return pending.sent
  }

  private async sendCorrections (deltas: Map<string, number>): Promise<void> {
    if (this.corrections?.deltas === deltas) this.corrections = undefined
    const args: Array<string | number> = []
    const calls: Array<Promise<unknown>> = []
    const send = (): void => { calls.push(this.client[COMMAND.fairCorrect](this.prefix + 'vt:', ...args.splice(0))) }
    for (const [counter, delta] of deltas) {
      if (delta === 0) continue
      const cut = counter.indexOf('\n')
      args.push(counter.slice(0, cut), counter.slice(cut + 1), delta)
      if (args.length === CORRECTIONS_PER_CALL * 3) send()
    }
    if (args.length > 0) send()
    await Promise.all(calls)
  }

  /**
   * Attempts in one script call (services/lua/attempt-1.lua: one epoch check and one set of its
   * definitions for all of them, which cost more than most attempts' own work). Each gets its own
   * answer; the grants the call made to waiters go with the first.
   */
  private async attemptAll (batch: Array<Array<string | number>>): Promise<Reply[]> {
    const r = await this.run('attempt', ...(batch.length === 1 ? batch[0] : batch.flat()))
    const out: Reply[] = []
    let at = 0
    for (let i = 0; i < batch.length; i++) {
      const n = Number(r.body[at])
      out.push({ body: r.body.slice(at + 1, at + 1 + n), grants: i === 0 ? r.grants : [] })
      at += 1 + n
    }
    if (out.length !== batch.length || at !== r.body.length) throw new Error('lease store: the attempts\' answers do not match them')
    return out
  }

  async sweep (members: string[]): Promise<SweepResult> {
    const lines = new Set<string>()
    for (const m of members) {
      const line = this.lineOf.get(m)
      if (line != null) lines.add(line)
    }
    const asked = new Set(members)
    for (const m of this.lineOf.keys()) if (!asked.has(m)) this.lineOf.delete(m)
    const r = await this.run('sweep', lines.size, ...lines, ...members)
    this.deliver(r.grants)
    const sep = r.body.indexOf('--')
    const grants = [...r.grants, ...parseGrants(r.body.slice(0, sep), 0)]
    for (const g of grants) this.lineOf.delete(g.member)
    return { grants, unknown: r.body.slice(sep + 1).map(String) }
  }

  /** Hand this replica's grants from a script's reply on, as pub/sub would for another replica's. */
  private deliver (grants: Grant[]): void {
    const own = this.replicaId + '|'
    for (const g of grants) {
      if (g.member.startsWith(own)) {
        this.lineOf.delete(g.member)
        this.events?.onGrant(g)
      }
    }
  }

  async leave (_queue: string, member: string): Promise<void> {
    const r = await this.run('leave', member)
    this.lineOf.delete(member)
    this.deliver(r.grants)
  }

  async release (token: string): Promise<boolean> {
    return await this.releases.call(token)
  }

  private async releaseTokens (tokens: string[]): Promise<boolean[]> {
    const r = await this.run('release', ...tokens)
    this.deliver(r.grants)
    return tokens.map((_, i) => Number(r.body[i]) > 0)
  }

  async releaseGpus (gpuIds: string[]): Promise<{ released: number, inFlight: string[] }> {
    assertSafeIds([{ assignmentId: 'x', gpuIds }])
    const r = await this.run('releaseGpus', gpuIds.join(','))
    this.deliver(r.grants)
    return { released: Number(r.body[0]), inFlight: String(r.body[1] ?? '').split(',').filter(Boolean) }
  }

  async renew (leases: HeldLease[]): Promise<string[]> {
    if (leases.length === 0) {
      await this.sweep([...this.lineOf.keys()])
      return []
    }
    const flat: Array<string | number> = []
    for (const l of leases) {
      flat.push(l.token, l.gpuIds.join(','), l.assignmentId, l.slots, l.queue, l.info.model, l.info.kind, l.info.purpose)
    }
    const r = await this.run('renew', ...flat)
    this.deliver(r.grants)
    return r.body.map(String)
  }

  async ping (token: string): Promise<HeldLease | undefined> {
    const r = await this.run('ping', token)
    this.deliver(r.grants)
    const l = r.body as Array<string | null>
    if (l.length === 0) return undefined
    const info: LeaseInfo = { model: l[3] ?? '', kind: l[4] ?? '', purpose: (l[5] as LeaseInfo['purpose']) ?? 'reservation' }
    return {
      token, gpuIds: (l[0] ?? '').split(',').filter(Boolean), assignmentId: l[1] ?? '', queue: l[2] ?? '', info, slots: Number(l[6] ?? 1)
    }
  }

  async tokensOf (gpuIds: string[]): Promise<string[][]> {
    if (gpuIds.length === 0) return []
    assertSafeIds([{ assignmentId: 'x', gpuIds }])
    const owners = await this.client.mget(...gpuIds.map((g) => this.prefix + 'gpu:' + g))
    const now = Date.now()
    return await Promise.all(owners.map(async (a) => {
      if (a == null) return []
      const members = await this.client.zrangebyscore(this.prefix + 'slots:' + a, now, '+inf')
      return [...new Set(members.map((s) => s.replace(/\/\d+$/, '')))]
    }))
  }

  async status (gpuIds: string[]): Promise<StoreStatus> {
    const r = await this.run('status', gpuIds.join(','), STATUS_QUEUES_LIMIT)
    const b = r.body.map(String)
    const out: StoreStatus = { gpus: [], queues: {}, queueSince: {}, holds: {} }
    let i = 0
    const now = Date.now()
    for (; b[i] !== '--'; i += 9) {
      const ttl = Number(b[i + 8])
      out.gpus.push({
        gpuId: b[i],
        assignmentId: b[i + 1],
        slotsUsed: Number(b[i + 2]),
        capacity: Number(b[i + 3]),
        token: b[i + 4],
        model: b[i + 5] || undefined,
        purpose: b[i + 6] || undefined,
        since: b[i + 7] !== '' ? Number(b[i + 7]) : undefined,
        expiresAt: ttl >= 0 ? now + ttl : undefined
      })
    }
    for (i++; b[i] !== '--'; i += 3) {
      out.queues[b[i]] = Number(b[i + 1])
      if (b[i + 2] !== '') out.queueSince[b[i]] = Number(b[i + 2])
    }
    for (i++; i < b.length; i += 2) out.holds[b[i]] = b[i + 1]
    return out
  }

  async publishInventoryChanged (): Promise<void> {
    await this.client.publish(this.channel, 'i')
  }

  available (): boolean {
    return this.client.status === 'ready'
  }

  async close (): Promise<void> {
    this.subscriber.removeAllListeners('message')
  }
}
