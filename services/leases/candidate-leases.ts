import { CandidateRound, type Cooldowns } from './candidate-choice.js'
import { GatewayError } from '../http/errors.js'
import type { Exchange } from '../http/exchange.js'
import type { Assignment, Inventory, ModelKind } from '../fleet/inventory.js'
import type { Lease, LeaseManager } from './lease-manager.js'
import { candidatesOf, queueName, type ClientRef } from './lease-store.js'
import { modelKey } from '../fleet/model-name.js'
import type { PromptFingerprint } from '../scheduling/prefix-fingerprint.js'
import { DEFAULT_OUTPUT_TOKENS, type Plan, type Route, type Scheduler } from '../scheduling/scheduler.js'

/** What a leased route asks for. */
export interface LeaseTarget {
  kind: ModelKind
  model: string
  /** Restrict the choice (e.g. the server that holds an uploaded file); default: every assignment of the model. */
  candidates?: readonly Assignment[]
  /** The prompt's fingerprints (services/scheduling/prefix-fingerprint.ts): the cost-aware choice of CONTRACT 16. */
  prompt?: PromptFingerprint
}

/** What leasing among a model's candidates needs from the gateway. */
export interface CandidateLeaseDeps {
  /** The inventory as it is now: a server drained while a request waits is given back. */
  inventory: () => Inventory
  leases: Pick<LeaseManager, 'acquire' | 'release'>
  /** Assignment ids among the candidates where the model is loaded (LLMs), tried first. */
  preferredAmong: (candidates: readonly Assignment[], model: string) => string[]
  cooldowns: Cooldowns
  log: { warn: (obj: object, msg: string) => void }
  /** FALLBACK_AFTER_MS: a request expected to wait longer goes to a fallback that can serve it sooner; undefined: never by wait. */
  fallbackAfterMs?: number
  /** The expected wait of one more request among `candidates` in `queue` (services/leases/expected-wait.ts). */
  expectedWaitMs?: (candidates: readonly Assignment[], queue: string) => Promise<number>
  /** Told how long each lease was held, per queue (the service times the expected wait learns). */
  held?: (queue: string, heldMs: number) => void
  /** Scheduler v3 (CONTRACT 16): orders the free candidates by cost, may wait a while for the servers holding the prefix or the model. */
  scheduler?: Scheduler
  /** Told how long each scheduling decision took, in seconds. */
  decided?: (seconds: number) => void
}

/** The request the leases are for. */
export interface LeaseRequester {
  exchange: Exchange
  client: ClientRef
  /** The client's limits (403/429 as a GatewayError); called once, before the first lease. */
  admit: () => Promise<{ granted: (queuedMs: number) => void }>
  /** Told once, when `admit` has let the request in. */
  admitted?: () => void
  /** Told of each lease, before `next` hands it out. */
  leased?: (held: HeldCandidate) => void
  /** Whether the client may use a model (a fallback is never one it may not). */
  mayUse: (model: string) => boolean
}

export interface HeldCandidate {
  assignment: Assignment
  /**
   * The model the lease is for, as the inventory names it: the one asked for, an alias's target,
   * or a fallback. The forwarded body's `model` becomes it when it differs from the one asked for.
   */
  model: string
  /** The alias the client asked for, when `model` is its target: the answer's `model` is the alias again. */
  alias?: string
  /** Scheduler v3's plan for this lease, and why this server (`x-maestro-route`). */
  plan?: Plan
  route?: Route
  lease: Lease
  /** Release once; also bound to the end of the exchange. */
  release: () => void
}

export type CandidateLeases = ReturnType<typeof candidateLeases>

/** One model's servers as a request goes through them. */
interface Way {
  model: string
  queue: string
  all: readonly Assignment[]
  round: CandidateRound
}

/**
 * One request's way through the model's candidates (services/leases/candidate-choice.ts says which to
 * try next), leasing each in turn. Shared by every leased route, so choice, queueing and release
 * work the same everywhere. Throws 404 for an unknown model, 503 when every server is drained.
 *
 * An alias is leased as its target (CONTRACT 17). A model with fallbacks (those the client may
 * use, in order) goes to the first that can serve it, before any lease is taken: when none of its
 * own servers is undrained (at once) or reachable (every one cooling down at the start, or found
 * unreachable by this request), or when its expected wait passes FALLBACK_AFTER_MS and a
 * fallback's is shorter. Never once a lease is held: an answer comes from one model.
 */
export function candidateLeases (deps: CandidateLeaseDeps, requester: LeaseRequester, target: LeaseTarget) {
  const { exchange } = requester
  const inventory = deps.inventory()
  const asked = target.model
  const served = target.candidates != null ? asked : inventory.aliasTarget(asked) ?? asked
  const wayOf = (model: string, all: readonly Assignment[]): Way =>
    ({ model, all, queue: queueName(target.kind, modelKey(model)), round: new CandidateRound(all, deps.cooldowns, model) })
  // The fallbacks this client may use, each once, the model itself never.
  const fallbacks: string[] = []
  if (target.candidates == null) {
    const listed = inventory.fallbacksOf(asked)
    const ofTarget = asked === served ? [] : inventory.fallbacksOf(served)
    if (listed.length + ofTarget.length > 0) {
      const seen = new Set([modelKey(served)])
      for (const f of [...listed, ...ofTarget]) {
        if (seen.has(modelKey(f)) || !requester.mayUse(f)) continue
        seen.add(modelKey(f))
        fallbacks.push(f)
      }
    }
  }
  /** The next fallback with undrained servers, or undefined when none is left. */
  const nextFallback = (): Way | undefined => {
    while (fallbacks.length > 0) {
      const model = fallbacks.shift() as string
      const all = deps.inventory().candidateList(model, target.kind)
      if (all.length > 0) return wayOf(model, all)
    }
    return undefined
  }
  const own = target.candidates ?? inventory.candidateList(served, target.kind)
  const start = own.length > 0 ? wayOf(served, own) : nextFallback()
  if (start === undefined) {
    // Every server of the model drained by an operator: it exists, it is just not taking work.
    if (inventory.candidateList(served, target.kind, { drained: true }).length > 0) {
      throw new GatewayError(503, `every server of model '${asked}' is drained`, 5)
    }
    throw new GatewayError(404, `model '${asked}' not found`)
  }
  let way: Way = start
  exchange.model = way.model
  const useWay = (next: Way): Way => { exchange.model = next.model; way = next; return next }
  const cooling = (all: readonly Assignment[], now = Date.now()): boolean => all.every((a) => deps.cooldowns.cooling(a.id, now))

  /** Before the first lease: a fallback when every server of the model sits out a cooldown, or its wait is too long. */
  const chooseFirst = async (): Promise<void> => {
    if (fallbacks.length === 0) return
    if (cooling(way.all)) {
      const ready = fallbacks.findIndex((f) => { const all = deps.inventory().candidateList(f, target.kind); return all.length > 0 && !cooling(all) })
      if (ready >= 0) useWay(wayOf(...pick(ready)))
      return
    }
    const after = deps.fallbackAfterMs
    if (after === undefined || deps.expectedWaitMs === undefined) return
    const wait = await deps.expectedWaitMs(way.all, way.queue)
    if (wait <= after) return
    for (let i = 0; i < fallbacks.length; i++) {
      const all = deps.inventory().candidateList(fallbacks[i], target.kind)
      if (all.length === 0 || cooling(all)) continue
      const sooner = await deps.expectedWaitMs(all, queueName(target.kind, modelKey(fallbacks[i])))
      if (sooner < wait) { useWay(wayOf(...pick(i))); return }
    }
  }
  /** Takes fallback i out of the list (those before it stay, for when it turns out unreachable). */
  const pick = (i: number): [string, readonly Assignment[]] => {
    const [model] = fallbacks.splice(i, 1)
    return [model, deps.inventory().candidateList(model, target.kind)]
  }

  /** Scheduler v3: the plan for leasing among `choice` (LLMs only). */
  const schedule = async (choice: readonly Assignment[], way: Way): Promise<Plan | undefined> => {
    if (deps.scheduler === undefined || target.kind !== 'llm') return undefined
    const started = performance.now()
    const plan = await deps.scheduler.plan(choice, way.model, target.prompt)
    // (a model on one server has nothing to decide: not timed)
    if (plan.chose) deps.decided?.((performance.now() - started) / 1000)
    return plan
  }

  // Fair share by tokens (CONTRACT 16.4): the prompt's estimated tokens and the output asked for (or a default)
  const cost = target.prompt !== undefined ? target.prompt.promptTokens + (target.prompt.maxOutputTokens ?? DEFAULT_OUTPUT_TOKENS) : undefined

  const isDrained = (a: Assignment): boolean => deps.inventory().assignment(a.id)?.drained === true
  let admitted: ReturnType<LeaseRequester['admit']> | undefined
  let first = true
  return {
    /** The next lease, or undefined when every candidate (of the model and its fallbacks) has been found unreachable. */
    async next (): Promise<HeldCandidate | undefined> {
      if (first) {
        first = false
        if (fallbacks.length > 0) await chooseFirst()
      }
      let choice = way.round.next()
      while (choice === undefined) {
        const next = nextFallback()
        if (next === undefined) return undefined
        choice = useWay(next).round.next()
      }
      // the client's limits (403/429), checked once per request, held until the exchange ends
      const firstAdmit = admitted === undefined
      const pass = await (admitted ??= requester.admit())
      if (firstAdmit) requester.admitted?.()
      let lease: Lease
      let assignment: Assignment
      let plan: Plan | undefined
      for (;;) {
        // (a model on one server: planned at once, no read to wait for)
        plan = choice.length < 2 && deps.scheduler !== undefined && target.kind === 'llm'
          ? deps.scheduler.planOne(choice, target.prompt)
          : await schedule(choice, way)
        lease = await deps.leases.acquire({
          queue: way.queue,
          candidates: candidatesOf(choice),
          info: { model: way.model, kind: target.kind, purpose: 'proxy' as const },
          requester: exchange,
          client: requester.client,
          // warm servers first among the free ones (the background poll and the gateway's own traffic)
          preferred: plan?.preferred ?? (target.kind === 'llm' ? deps.preferredAmong(choice, way.model) : undefined),
          cost,
          // late binding: the server holding the prefix, and how long to wait for it (or the model's servers) alone
          lateBinding: plan !== undefined,
          holder: plan?.holder,
          pinMs: plan !== undefined && plan.pinMs > 0 ? plan.pinMs : undefined
        })
        assignment = choice[lease.candidateIndex]
        // Drained while this request waited (its candidates were chosen before): give the lease
        // back unused and wait for the others (or a fallback's).
        if (!isDrained(assignment)) break
        void deps.leases.release(lease)
        choice = choice.filter((a) => !isDrained(a))
        if (choice.length === 0) {
          const next = nextFallback()
          if (next === undefined) throw new GatewayError(503, `every server of model '${asked}' is drained`, 5)
          choice = useWay(next).all
        }
      }
      pass.granted(lease.queuedMs)
      exchange.leased(assignment.name, lease.gpuIds, lease.queuedMs)
      const { queue, model } = way
      let released = false
      const release = (): void => {
        if (released) return
        released = true
        exchange.released()
        deps.held?.(queue, performance.now() - lease.grantedAt)
        void deps.leases.release(lease)
      }
      // Not released when the client leaves: the upstream may still be working on the GPUs
      // (a non-streamed answer, an image). Each way of using the lease says when it is done.
      const route = target.kind === 'llm' ? deps.scheduler?.route(plan, assignment, model) : undefined
      const held: HeldCandidate = { assignment, model, alias: model === served && served !== asked ? asked : undefined, plan, route, lease, release }
      requester.leased?.(held)
      return held
    },
    /** The upstream was unreachable before it saw the request: sit it out, try the next. */
    unreachable (assignment: Assignment, error: unknown): void {
      way.round.unreachable(assignment, error)
      exchange.upstreamFailed(assignment.name, 'unreachable')
      deps.log.warn({ err: error, assignment: assignment.name }, 'upstream unreachable; trying the next candidate')
    },
    exhausted: () => way.round.exhausted()
  }
}
