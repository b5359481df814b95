/**
 * Scheduler v3's choice for one lease (CONTRACT 16): reads the affinity map, estimates each
 * choice's time to first token (cost-model.ts) and says where the lease store should look first
 * and whether to wait for one server (or the warm ones) for a while. The lease store still makes
 * every grant, so fairness, capacity and exclusivity stay its own; this only orders and pins.
 *
 * Late binding, gateway side: a request whose prefix (or model) is held by busy servers waits in
 * the line of those servers alone, for at most its wait budget (the estimate's margin over the
 * best other server, capped at AFFINITY_MAX_WAIT_MS), then in its model's whole line. Taken only
 * when the expected wait there (from the store's status) is below that margin. No Fastify here.
 *
 * Cost per request: none with one candidate; else one affinity read (an HMGET of at most 8
 * fields) and one write once leased; the status read only when
 * a wait is worth considering. Candidates considered are bounded (the holder, up to
 * PREFERRED_MAX warm ones, one cold one): O(1) in fleet size and queue length.
 */
import type { Assignment } from '../fleet/inventory.js'
import type { AffinityHit, AffinityMap } from './affinity-map.js'
import { rank, waitBudgetMs, type CandidateView, type Estimate, type LearnedRates } from './cost-model.js'
import type { PromptFingerprint } from './prefix-fingerprint.js'

export type Route = 'affinity' | 'warm' | 'free' | 'load'

/** A wait for the servers holding the prefix or the model is considered only when it saves at least this. */
const MIN_MARGIN_MS = 25
/** Output tokens charged before the answer says (when the body gives no limit). */
export const DEFAULT_OUTPUT_TOKENS = 256

export interface SchedulerDeps {
  affinity?: AffinityMap
  rates: LearnedRates
  /** Where `model` is loaded (poll, own traffic): a few ids among the candidates. */
  warmAmong: (candidates: readonly Assignment[], model: string) => string[]
  /** Whether `model` is loaded on the assignment's server (poll, own traffic). */
  isLoaded: (assignment: Assignment, model: string) => boolean
  /** Whether the gateway knows what is loaded on the assignment's server (its poll answered). */
  known: (assignment: Assignment) => boolean
  /** Expected wait, ms, of one more request on these candidates of `queue` (the store's status). */
  expectedWaitMs: (candidates: readonly Assignment[], queue: string) => Promise<number>
  maxWaitMs: number
}

export interface Plan {
  /** Ids tried first among the free candidates, cheapest first. */
  preferred: string[]
  /** Wait for these alone for `waitMs` first (a subset of the candidates). */
  pinned?: { candidates: Assignment[], waitMs: number }
  hit?: AffinityHit
  /** Estimated prompt tokens (for the fairness charge and the prefill saved). */
  promptTokens: number
  estimates: Estimate[]
  /** There was a choice (more than one candidate): the map was read, and the lease is remembered in it. */
  chose: boolean
}

export class Scheduler {
  constructor (private readonly deps: SchedulerDeps) {}

  async lookup (model: string, prompt: PromptFingerprint | undefined): Promise<AffinityHit | undefined> {
    if (prompt === undefined || this.deps.affinity === undefined) return undefined
    try {
      return await this.deps.affinity.lookup(model, prompt.hashes)
    } catch {
      // the map is a hint: without it the request is routed as before
      return undefined
    }
  }

  async plan (choice: readonly Assignment[], model: string, queue: string, prompt: PromptFingerprint | undefined): Promise<Plan> {
    const promptTokens = prompt?.promptTokens ?? 0
    // One candidate (a model on one server): nothing to choose, nothing to read or remember.
    if (choice.length < 2) return { preferred: choice.map((a) => a.id), promptTokens, estimates: [], chose: false }
    const found = await this.lookup(model, prompt)

    const holder = found === undefined ? undefined : choice.find((a) => a.id === found.assignmentId)
    const hit = holder === undefined ? undefined : found
    const warm = new Set(this.deps.warmAmong(choice, model))
    const views: CandidateView[] = []
    const byId = new Map<string, Assignment>()
    const add = (a: Assignment, cachedTokens: number): void => {
      if (byId.has(a.id)) return
      byId.set(a.id, a)
      // it served the prefix: its model was loaded there then
      views.push({ assignmentId: a.id, resident: warm.has(a.id) || a === holder, cachedTokens, waitMs: 0 })
    }
    // what the holder has cached: the matched prefix, and its own answer when the prompt resends it
    if (holder !== undefined && hit !== undefined) add(holder, Math.max(hit.tokens, prompt?.held[hit.index] ?? 0))
    for (const a of choice) if (warm.has(a.id)) add(a, 0)
    const cold = choice.find((a) => !byId.has(a.id))
    if (cold !== undefined) add(cold, 0)
    const estimates = rank(views, promptTokens, this.deps.rates)
    const preferred = estimates.filter((e) => e.assignmentId !== cold?.id).map((e) => e.assignmentId)
    const plan: Plan = { preferred, promptTokens, estimates, chose: true, ...(hit !== undefined ? { hit } : {}) }
    if (this.deps.maxWaitMs <= 0 || estimates.length < 2) return plan
    // Who would be worth waiting for: the holder when it is the cheapest, else the warm servers
    // when a cold one is the alternative.
    const best = estimates[0]
    const pinnedIds = best.assignmentId === holder?.id ? [holder.id] : (warm.size > 0 && cold !== undefined ? [...warm].filter((id) => byId.has(id)) : [])
    if (pinnedIds.length === 0 || pinnedIds.length >= choice.length) return plan
    const alternative = estimates.find((e) => !pinnedIds.includes(e.assignmentId))
    const pinnedBest = estimates.find((e) => pinnedIds.includes(e.assignmentId)) as Estimate
    if (alternative === undefined || alternative.ttftMs - pinnedBest.ttftMs < MIN_MARGIN_MS) return plan
    const pinned = pinnedIds.map((id) => byId.get(id) as Assignment)
    let waitMs = 0
    try {
      waitMs = await this.deps.expectedWaitMs(pinned, queue)
    } catch {
      return plan
    }
    const budget = waitBudgetMs({ ...pinnedBest, waitMs }, alternative, this.deps.maxWaitMs)
    if (budget > 0) plan.pinned = { candidates: pinned, waitMs: budget }
    return plan
  }

  /** Why this server: the route the answer's `x-maestro-route` names. */
  route (plan: Plan | undefined, assignment: Assignment, model: string): Route {
    if (plan?.hit !== undefined && plan.hit.assignmentId === assignment.id) return 'affinity'
    if (this.deps.isLoaded(assignment, model)) return 'warm'
    return this.deps.known(assignment) ? 'load' : 'free'
  }

  /** The prefill an affinity hit saves, in estimated tokens. */
  savedTokens (plan: Plan, assignment: Assignment): number {
    return plan.hit !== undefined && plan.hit.assignmentId === assignment.id ? Math.min(plan.hit.tokens, plan.promptTokens) : 0
  }

  estimateOf (plan: Plan, assignmentId: string): Estimate | undefined {
    return plan.estimates.find((e) => e.assignmentId === assignmentId)
  }
}
