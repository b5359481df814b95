/**
 * The lease store: where GPU leases and the wait queues live. Two implementations share these
 * semantics — Redis (many replicas, Lua scripts in `services/lua/`) and memory (one process) — and
 * one rule suite (test/lease-rules.ts).
 *
 * Vocabulary:
 * - assignment: one upstream server on some GPUs, with a capacity (parallel slots, >= 1).
 * - slot lease: one request on an assignment; up to `capacity` at once. The GPUs of an assignment
 *   that runs anything belong to it: no other assignment gets them until its last slot ends.
 * - candidate list: the assignments a request may use, in preference order (a model's, or a
 *   restricted one). A waiter waits in the line of its queue (model) and list: everyone in one
 *   line wants the same candidates, so nobody waits behind a waiter pinned to a busy server.
 * - within a line: by priority (high, normal, low; a waiter counts one level higher for every
 *   `priorityAgingMs` it has waited), then round-robin between clients (start-time fair queuing),
 *   each client in its own arrival order. Across lines: the one whose next waiter arrived first.
 * - late binding (Scheduler v3 waiters only): when a line is served, the first few waiters of the
 *   first few lines of its list are looked at and a free server goes to the one it serves cheapest
 *   (its prompt prefix's holder, then a waiter of the model its last lease ran), within a bound
 *   (`passOverMs`) past which a waiter is served strictly first.
 * - member: one waiter, `<replicaId>|<n>`; a member whose replica stops heart-beating is dead.
 * - token: one lease, `<member>#<fence>`; the fence grows with every grant.
 */

export interface Candidate {
  assignmentId: string
  gpuIds: string[]
  /** Parallel slots (>= 1, default 1). */
  capacity?: number
}

export type Priority = 'high' | 'normal' | 'low'

/** Who asks: fair share and priority apply between clients. Absent: one anonymous normal client. */
export interface ClientRef {
  id: string
  priority: Priority
}

/** What a lease is for, kept with it so `/gpu/status` can say who holds what. */
export interface LeaseInfo {
  model: string
  kind: string
  /**
   * 'proxy' leases are renewed by the replica while in flight; 'reservation' ones only by ping,
   * and take every slot of their assignment.
   */
  purpose: 'proxy' | 'reservation'
}

export interface Grant {
  member: string
  token: string
  candidateIndex: number
}

/** A waiter's place in its line: kept so that it can be queued again in the same order. */
export interface Place {
  score: number
  since: number
}

export type AttemptResult =
  | { status: 'granted', token: string, candidateIndex: number, grants: Grant[] }
  | { status: 'waiting', position: number, place: Place, grants: Grant[] }
  | { status: 'paused', place: Place, grants: Grant[] }
  | { status: 'full', scope: 'queue' | 'total', grants: Grant[] }

export interface AttemptInput {
  member: string
  queue: string
  candidates: Candidate[]
  info: LeaseInfo
  client?: ClientRef
  /** Assignment ids to try first among the free candidates (model loaded there); never waited for. */
  preferred?: string[]
  /**
   * What the request costs its client in the fair order (CONTRACT 16.4): its estimated tokens
   * (prompt + output); the start-time fair queuing tag advances by it. Default 1 (a request).
   */
  cost?: number
  /** Set when the waiter was queued before and lost its place (store restarted): keeps its order. */
  place?: Place
  /**
   * Late binding (CONTRACT 16.2): the assignment holding the request's prompt prefix. When it frees,
   * it goes to this waiter before the others among the first few of its lines.
   */
  holder?: string
  /**
   * For this long after it queues, the waiter takes only its holder or, without one, a server whose
   * last lease was for its model (the estimate says waiting for them beats a cold server). 0: none.
   */
  pinMs?: number
  /**
   * A Scheduler v3 waiter: later waiters that a freed server serves cheaper may pass it, for at most
   * the store's `passOverMs` after its arrival. Others are never passed over.
   */
  lateBinding?: boolean
}

/**
 * A request's charge in the fair order, set right once its answer has told the server's own
 * counts (CONTRACT 16.4): the client's virtual counter in the line the request was admitted to
 * moves by `tokens − charged`.
 */
export interface ChargeCorrection {
  queue: string
  candidates: Candidate[]
  purpose: LeaseInfo['purpose']
  client?: ClientRef
  /** what the request was charged at admission (its fairCost) */
  charged: number
  /** what the server counted: prompt tokens (the whole prompt) + output tokens */
  tokens: number
}

export interface HeldLease {
  token: string
  gpuIds: string[]
  assignmentId: string
  /** Slots this lease holds: 1, or the capacity for a reservation. */
  slots: number
  queue: string
  info: LeaseInfo
}

export interface GpuLeaseState {
  gpuId: string
  /** One of the leases running on the GPU. */
  token: string
  assignmentId?: string
  model?: string
  purpose?: string
  since?: number
  expiresAt?: number
  slotsUsed: number
  capacity: number
}

export interface StoreStatus {
  gpus: GpuLeaseState[]
  /** Live waiters per queue (the most recently active queues only). */
  queues: Record<string, number>
  /**
   * When the oldest live waiter of each of those queues arrived (epoch ms; a waiter queued again
   * at its old place keeps its first arrival). No entry for a queue nobody waits in.
   */
  queueSince: Record<string, number>
  /** GPUs held back for a starving waiter: gpu id → member. */
  holds: Record<string, string>
}

export interface SweepResult {
  /** Grants to the given members (lost notifications included). */
  grants: Grant[]
  /** Given members the store does not know (dropped while this replica seemed dead): queue them again. */
  unknown: string[]
}

export interface StoreEvents {
  /**
   * One of this replica's waiters was granted a lease: by another replica (a notification), or by
   * a call of this store that served a queue (leave, release, releaseGpus: told before that call
   * resolves, so the next request on freed GPUs starts without waiting for a notification).
   * `attempt` and `sweep` return their grants instead. The same grant may be told twice.
   */
  onGrant: (grant: Grant) => void
  /** Another part of the cluster asked every replica to read the inventory again. */
  onInventoryChanged: () => void
  /**
   * The store came back after being unreachable, lost its data, or had judged this replica dead:
   * re-assert leases, re-enqueue waiters.
   */
  onReconnect: () => void
}

export interface LeaseStoreOptions {
  ttlMs: number
  queueMax: number
  /** Waiters across every queue (QUEUE_MAX_TOTAL); default 10000. */
  queueMaxTotal?: number
  starvationMs: number
  /** PRIORITY_AGING_MS; default 30000. */
  priorityAgingMs?: number
  /**
   * Late binding's fairness bound (AFFINITY_MAX_WAIT_MS): a waiter of Scheduler v3 (one with a
   * holder or a pin) may be passed over by later waiters that a freed server serves cheaper for
   * this long after its arrival, then it is served strictly first. Default 0: never passed over.
   */
  passOverMs?: number
}

export const DEFAULT_QUEUE_MAX_TOTAL = 10_000
export const DEFAULT_PRIORITY_AGING_MS = 30_000

export interface LeaseStore {
  readonly kind: 'redis' | 'memory'
  /** The replica this store speaks for; members are `<replicaId>|<n>`. */
  readonly replicaId: string
  /** Subscribe to grants and other cluster events. */
  start: (events: StoreEvents) => Promise<void>
  /** Enqueue (when new) and serve the line; answers whether this member now holds a lease. */
  attempt: (input: AttemptInput) => Promise<AttemptResult>
  /**
   * Heartbeat and fallback poll in one round trip: keeps this replica and its waiters alive,
   * serves their lines, reports grants already made to them and the members it no longer knows.
   */
  sweep: (members: string[]) => Promise<SweepResult>
  /** Leave the queue; a lease granted meanwhile is released. */
  leave: (queue: string, member: string) => Promise<void>
  /** Release by token (compare-and-delete); grants freed slots to waiters. True if it was held. */
  release: (token: string) => Promise<boolean>
  /**
   * Release the reservations holding these GPUs (the original API's release by GPU id), each once.
   * A GPU serving a request in flight is left alone: freeing it would hand it to a second request.
   */
  releaseGpus: (gpuIds: string[]) => Promise<{ released: number, inFlight: string[] }>
  /**
   * Renew leases, re-creating those the store lost where their slots are still free; returns the
   * tokens lost (taken by others, or released).
   */
  renew: (leases: HeldLease[]) => Promise<string[]>
  /**
   * Correct a client's charge in the fair order with the server's counts (one bounded call).
   * Nothing happens when the line's fair state is gone (idle past 3 ttl: it started over).
   */
  correctCharge: (correction: ChargeCorrection) => Promise<void>
  /** Renew one lease only if it still exists (reservations); undefined when it expired. */
  ping: (token: string) => Promise<HeldLease | undefined>
  /** The leases running on each GPU, for a ping by GPU id. */
  tokensOf: (gpuIds: string[]) => Promise<string[][]>
  status: (gpuIds: string[]) => Promise<StoreStatus>
  /** Tell every replica to reload the inventory. */
  publishInventoryChanged: () => Promise<void>
  /** False while the store cannot be reached: no lease can be proven free then. */
  available: () => boolean
  close: () => Promise<void>
}

/** Most queues a status reports (it is on an open route). */
export const STATUS_QUEUES_LIMIT = 200

export const PRIORITY_LEVEL: Record<Priority, number> = { high: 0, normal: 1, low: 2 }

/** Most a request is charged in the fair order: tags stay far below the priority levels' 2^40. */
export const FAIR_COST_MAX = 1_000_000

/** A request's cost in the fair order: a whole number of tokens, 1 to FAIR_COST_MAX (1 when absent). */
export function fairCost (cost: number | undefined): number {
  return cost !== undefined && Number.isFinite(cost) ? Math.min(FAIR_COST_MAX, Math.max(1, Math.round(cost))) : 1
}

/** A waiter's pin, whole ms (0: none). */
export function pinMsOf (input: Pick<AttemptInput, 'pinMs'>): number {
  return input.pinMs !== undefined && Number.isFinite(input.pinMs) && input.pinMs > 0 ? Math.round(input.pinMs) : 0
}

export function capacityOf (c: Candidate): number {
  return Number.isInteger(c.capacity) && (c.capacity as number) >= 1 ? c.capacity as number : 1
}

/** GPU and assignment ids become parts of store keys: keep them to a safe alphabet. */
export const SAFE_ID = /^[A-Za-z0-9._-]{1,64}$/

export function assertSafeIds (candidates: Candidate[]): void {
  for (const c of candidates) {
    if (!SAFE_ID.test(c.assignmentId)) throw new Error(`unsafe assignment id ${JSON.stringify(c.assignmentId)}`)
    for (const g of c.gpuIds) {
      if (!SAFE_ID.test(g)) throw new Error(`unsafe gpu id ${JSON.stringify(g)}`)
    }
  }
}

/** Queue names computed so far (one per model in use); emptied when full, as names come from clients. */
const queueNames = new Map<string, string>()
const QUEUE_NAMES_LIMIT = 1000

/** Queue names carry user input (model names): hex keeps them from acting as key separators or globs. */
export function queueName (kind: string, modelKey: string): string {
  const label = `${kind}:${modelKey}`
  let name = queueNames.get(label)
  if (name === undefined) {
    name = Buffer.from(label, 'utf8').toString('hex')
    if (queueNames.size >= QUEUE_NAMES_LIMIT) queueNames.clear()
    queueNames.set(label, name)
  }
  return name
}

export function queueLabel (queue: string): string {
  return Buffer.from(queue, 'hex').toString('utf8')
}

export function memberOf (token: string): string {
  const i = token.lastIndexOf('#')
  return i < 0 ? token : token.slice(0, i)
}

/** What the inventory's assignments give a lease: an id, GPUs, a capacity. */
export interface CandidateSource {
  id: string
  gpuIds: string[]
  capacity?: number
}

const candidateLists = new WeakMap<readonly CandidateSource[], Candidate[]>()

/**
 * The candidates of a list of assignments, the same array each time for the same list: the
 * stores recognise a list they have seen by its array, and send the Redis store only its id.
 */
export function candidatesOf (assignments: readonly CandidateSource[]): Candidate[] {
  let list = candidateLists.get(assignments)
  if (list == null) {
    list = assignments.map((a) => ({ assignmentId: a.id, gpuIds: a.gpuIds, capacity: a.capacity ?? 1 }))
    candidateLists.set(assignments, list)
  }
  return list
}
