/**
 * The cost model (CONTRACT 16.1–16.3): what sending one request to a candidate costs before its
 * first token, estimated as expected wait + load (when the model is not resident there) +
 * prefill of the prompt tokens that server has not cached. Pure: the rates come in, the choice
 * goes out. No Fastify here.
 *
 * Rates are learned per assignment from the servers' own final lines (Ollama's
 * `prompt_eval_count − prompt_eval_cached_count` tokens computed in `prompt_eval_duration`, and
 * `load_duration`), as a moving average. Before the first line: DEFAULT_PREFILL_MS_PER_TOKEN and
 * DEFAULT_LOAD_MS. Each replica learns from the answers it passes on (about 1/N of the traffic
 * with N replicas behind a balancer): the rates are slow-moving properties of a server and its
 * model, so every replica converges on the same values without sharing them.
 */

/** Prefill before any final line was seen: 0.5 ms per computed prompt token. */
export const DEFAULT_PREFILL_MS_PER_TOKEN = 0.5
/** A model load before any was seen: 2 s. */
export const DEFAULT_LOAD_MS = 2000
/** A final line's `load_duration` above this counts as a load (a resident model reports a few ms). */
export const LOAD_THRESHOLD_MS = 100
/** Weight of the newest observation in the moving averages. */
const EWMA_WEIGHT = 0.3
/** Assignments remembered (ids come from the inventory, bounded all the same). */
const ASSIGNMENTS_MAX = 10_000
/** Prefills shorter than this many computed tokens say little about the rate (fixed overheads dominate). */
const MIN_PREFILL_TOKENS = 16

/** What one finished answer says about its server (Ollama's final line; durations in ms). */
export interface AnswerTimings {
  promptTokens?: number
  cachedTokens?: number
  promptEvalMs?: number
  loadMs?: number
}

interface Rates { prefillMsPerToken?: number, loadMs?: number }

const ewma = (was: number | undefined, value: number): number => was === undefined ? value : was + EWMA_WEIGHT * (value - was)

/** Per-assignment rates, learned from final lines. */
export class LearnedRates {
  private readonly rates = new Map<string, Rates>()

  /** Learns from one answer; true when it reports a load. */
  learn (assignmentId: string, t: AnswerTimings): boolean {
    let r = this.rates.get(assignmentId)
    if (r === undefined) {
      if (this.rates.size >= ASSIGNMENTS_MAX) this.rates.clear()
      r = {}
      this.rates.set(assignmentId, r)
    }
    const computed = (t.promptTokens ?? 0) - (t.cachedTokens ?? 0)
    if (computed >= MIN_PREFILL_TOKENS && t.promptEvalMs !== undefined && t.promptEvalMs > 0) {
      r.prefillMsPerToken = ewma(r.prefillMsPerToken, t.promptEvalMs / computed)
    }
    this.version++
    const loaded = t.loadMs !== undefined && t.loadMs > LOAD_THRESHOLD_MS
    if (loaded) r.loadMs = ewma(r.loadMs, t.loadMs as number)
    return loaded
  }

  /**
   * An assignment's prefill rate; one not seen yet is taken to be like those seen (their mean):
   * comparing a learned rate with a default would send work by the difference of two guesses.
   */
  prefillMsPerToken (assignmentId: string): number {
    return this.rates.get(assignmentId)?.prefillMsPerToken ?? this.mean('prefillMsPerToken') ?? DEFAULT_PREFILL_MS_PER_TOKEN
  }

  loadMs (assignmentId: string): number {
    return this.rates.get(assignmentId)?.loadMs ?? this.mean('loadMs') ?? DEFAULT_LOAD_MS
  }

  /** The mean load time of the assignments that have reported a load; undefined before the first. */
  observedLoadMs (): number | undefined {
    return this.mean('loadMs')
  }

  private readonly means: Partial<Record<keyof Rates, { at: number, value: number | undefined }>> = {}
  private version = 0

  /** The mean of a rate over the assignments that have one (recomputed after a change only). */
  private mean (key: keyof Rates): number | undefined {
    const cached = this.means[key]
    if (cached !== undefined && cached.at === this.version) return cached.value
    let sum = 0
    let n = 0
    for (const r of this.rates.values()) {
      const v = r[key]
      if (v !== undefined) { sum += v; n++ }
    }
    const value = n > 0 ? sum / n : undefined
    this.means[key] = { at: this.version, value }
    return value
  }
}

/** One candidate as the estimate sees it. */
export interface CandidateView {
  assignmentId: string
  /** The model is loaded on its server (poll or own traffic). */
  resident: boolean
  /** Prompt tokens its server is believed to hold in cache for this request (affinity). */
  cachedTokens: number
  /** Expected wait before a slot there, ms (0 when free). */
  waitMs: number
}

export interface Estimate {
  assignmentId: string
  /** Expected time to first token, ms. */
  ttftMs: number
  waitMs: number
  loadMs: number
  prefillMs: number
}

/** The expected time to first token of `promptTokens` on one candidate. */
export function estimate (c: CandidateView, promptTokens: number, rates: Pick<LearnedRates, 'prefillMsPerToken' | 'loadMs'>): Estimate {
  const loadMs = c.resident ? 0 : rates.loadMs(c.assignmentId)
  // a model being loaded holds no prompt cache
  const cached = c.resident ? Math.min(c.cachedTokens, promptTokens) : 0
  const prefillMs = Math.max(0, promptTokens - cached) * rates.prefillMsPerToken(c.assignmentId)
  return { assignmentId: c.assignmentId, ttftMs: c.waitMs + loadMs + prefillMs, waitMs: c.waitMs, loadMs, prefillMs }
}

/** The candidates by estimated time to first token, lowest first (ties: the given order). */
export function rank (candidates: readonly CandidateView[], promptTokens: number, rates: Pick<LearnedRates, 'prefillMsPerToken' | 'loadMs'>): Estimate[] {
  return candidates
    .map((c, i) => ({ e: estimate(c, promptTokens, rates), i }))
    .sort((a, b) => a.e.ttftMs - b.e.ttftMs || a.i - b.i)
    .map(({ e }) => e)
}

/**
 * How long waiting for `pinned` (busy) may last before the best free server is taken instead:
 * the estimate's margin (the free one's TTFT minus the pinned one's without its wait), capped
 * at `maxWaitMs`; 0 when waiting is not expected to pay (its expected wait is past the margin).
 */
export function waitBudgetMs (pinned: Estimate, bestFree: Estimate | undefined, maxWaitMs: number): number {
  if (bestFree === undefined) return maxWaitMs
  const margin = bestFree.ttftMs - (pinned.loadMs + pinned.prefillMs)
  if (margin <= 0 || pinned.waitMs >= margin) return 0
  return Math.min(maxWaitMs, margin)
}
