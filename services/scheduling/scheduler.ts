/**
 * Scheduler v3's choice for one lease (CONTRACT 16): reads the affinity map, estimates each
 * choice's time to first token (cost-model.ts) and tells the lease store where to look first,
 * which server holds the prompt's prefix, and how long the request should wait for that server
 * (or, without one, for a server with its model resident) rather than take a cold one. The lease
 * store makes every grant, so fairness, capacity and exclusivity stay its own.
 *
 * Late binding, store side (services/lua/includes/late-binding.lua, memory-lease-store.ts): a
 * request waits in its model's one line carrying its holder and its pin; a server that frees goes
 * to the waiter it serves cheapest among the first few (its prefix's, then its model's), within
 * the store's bound (AFFINITY_MAX_WAIT_MS). The pin lasts what the cold choice would cost: twice
 * the estimate's margin (the holder's prefill saved over the best other server, or without a
 * holder the load a server without the model would need), as a cold choice also evicts another
 * prompt's (or model's) state there that is then likely recomputed; capped at
 * AFFINITY_MAX_WAIT_MS. No Fastify here.
 *
 * Cost per request: none with one candidate; else one affinity read (an HMGET of at most 8
 * fields) and one write once leased. Candidates considered are bounded (the holder, up to
 * PREFERRED_MAX warm ones, one cold one): O(1) in fleet size and queue length.
 */
import type { Assignment } from '../fleet/inventory.js'
import type { AffinityHit, AffinityMap } from './affinity-map.js'
import { rank, waitBudgetMs, type CandidateView, type Estimate, type LearnedRates } from './cost-model.js'
import type { PromptFingerprint } from './prefix-fingerprint.js'

export type Route = 'affinity' | 'warm' | 'free' | 'load'

/** A wait for the server holding the prefix is worth it only when it saves at least this. */
const MIN_MARGIN_MS = 25
/**
 * What a cold choice costs, as a multiple of its own estimate: a load (or a prefill) on another
 * server takes its own time and, as it evicts another model (or another prompt's cached state)
 * there, about as much again later. The pins last this multiple of the estimate's margin.
 */
const COLD_COST_FACTOR = 2
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
  maxWaitMs: number
}

export interface Plan {
  /** Ids tried first among the free candidates, cheapest first. */
  preferred: string[]
  /** The assignment holding the prompt's prefix (late binding gives it this request first). */
  holder?: string
  /** How long the request waits only for its holder, or without one for a server with its model resident (0: not at all). */
  pinMs: number
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

  /** One candidate (a model on one server): nothing to choose, nothing to read or remember. */
  planOne (choice: readonly Assignment[], prompt: PromptFingerprint | undefined): Plan {
    return { preferred: choice.map((a) => a.id), pinMs: 0, promptTokens: prompt?.promptTokens ?? 0, estimates: [], chose: false }
  }

  async plan (choice: readonly Assignment[], model: string, prompt: PromptFingerprint | undefined): Promise<Plan> {
    if (choice.length < 2) return this.planOne(choice, prompt)
    const promptTokens = prompt?.promptTokens ?? 0
    const found = await this.lookup(model, prompt)

    const holder = found === undefined ? undefined : choice.find((a) => a.id === found.assignmentId)
    const hit = holder === undefined ? undefined : found
    const warm = new Set(this.deps.warmAmong(choice, model))
    const views: CandidateView[] = []
    const byId = new Set<string>()
    const add = (a: Assignment, cachedTokens: number): void => {
      if (byId.has(a.id)) return
      byId.add(a.id)
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
    const plan: Plan = { preferred, pinMs: 0, promptTokens, estimates, chose: true, hit, holder: hit !== undefined ? holder?.id : undefined }
    if (this.deps.maxWaitMs <= 0) return plan
    if (holder !== undefined) {
      // worth waiting for the holder when that saves more than MIN_MARGIN_MS: for the margin's cold cost
      const best = estimates[0]
      const alternative = estimates.find((e) => e.assignmentId !== holder.id)
      if (best.assignmentId === holder.id && alternative !== undefined) {
        const margin = waitBudgetMs(best, alternative, Infinity)
        if (margin >= MIN_MARGIN_MS) plan.pinMs = Math.min(this.deps.maxWaitMs, COLD_COST_FACTOR * margin)
      }
      return plan
    }
    // No holder: a server whose last lease was this model (the store knows which) beats one that
    // must load it, once loads have been seen to take time at all, for as long as a load elsewhere
    // costs.
    const loadMs = this.deps.rates.observedLoadMs()
    if (loadMs !== undefined && loadMs >= MIN_MARGIN_MS) plan.pinMs = Math.min(this.deps.maxWaitMs, COLD_COST_FACTOR * loadMs)
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
