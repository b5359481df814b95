import { CandidateRound, type Cooldowns } from './candidate-choice.js'
import { GatewayError } from '../http/errors.js'
import type { Exchange } from '../http/exchange.js'
import type { Assignment, Inventory, ModelKind } from '../fleet/inventory.js'
import type { Lease, LeaseManager } from './lease-manager.js'
import { candidatesOf, queueName, type ClientRef } from './lease-store.js'
import { modelKey } from '../fleet/model-name.js'

/** What a leased route asks for. */
export interface LeaseTarget {
  kind: ModelKind
  model: string
  /** Restrict the choice (e.g. the server that holds an uploaded file); default: every assignment of the model. */
  candidates?: readonly Assignment[]
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
}

/** The request the leases are for. */
export interface LeaseRequester {
  exchange: Exchange
  client: ClientRef
  /** The client's limits (403/429 as a GatewayError); called once, before the first lease. */
  admit: () => Promise<{ granted: (queuedMs: number) => void }>
}

export interface HeldCandidate {
  assignment: Assignment
  lease: Lease
  /** Release once; also bound to the end of the exchange. */
  release: () => void
}

export type CandidateLeases = ReturnType<typeof candidateLeases>

/**
 * One request's way through the model's candidates (services/leases/candidate-choice.ts says which to
 * try next), leasing each in turn. Shared by every leased route, so choice, queueing and release
 * work the same everywhere. Throws 404 for an unknown model, 503 when every server is drained.
 */
export function candidateLeases (deps: CandidateLeaseDeps, requester: LeaseRequester, target: LeaseTarget) {
  const { exchange } = requester
  const inventory = deps.inventory()
  const all = target.candidates ?? inventory.candidateList(target.model, target.kind)
  if (all.length === 0) {
    // Every server of the model drained by an operator: it exists, it is just not taking work.
    if (inventory.candidateList(target.model, target.kind, { drained: true }).length > 0) {
      throw new GatewayError(503, `every server of model '${target.model}' is drained`, 5)
    }
    throw new GatewayError(404, `model '${target.model}' not found`)
  }
  exchange.model = target.model
  const queue = queueName(target.kind, modelKey(target.model))
  const round = new CandidateRound(all, deps.cooldowns, target.model)
  const isDrained = (a: Assignment): boolean => deps.inventory().assignment(a.id)?.drained === true
  let admitted: ReturnType<LeaseRequester['admit']> | undefined
  return {
    /** The next lease, or undefined when every candidate has been found unreachable. */
    async next (): Promise<HeldCandidate | undefined> {
      let choice = round.next()
      if (choice === undefined) return undefined
      // the client's limits (403/429), checked once per request, held until the exchange ends
      const pass = await (admitted ??= requester.admit())
      let lease: Lease
      let assignment: Assignment
      for (;;) {
        lease = await deps.leases.acquire({
          queue,
          candidates: candidatesOf(choice),
          info: { model: target.model, kind: target.kind, purpose: 'proxy' as const },
          requester: exchange,
          client: requester.client,
          // warm servers first among the free ones (the background poll and the gateway's own traffic)
          preferred: target.kind === 'llm' ? deps.preferredAmong(choice, target.model) : undefined
        })
        assignment = choice[lease.candidateIndex]
        // Drained while this request waited (its candidates were chosen before): give the lease
        // back unused and wait for the others.
        if (!isDrained(assignment)) break
        void deps.leases.release(lease)
        choice = choice.filter((a) => !isDrained(a))
        if (choice.length === 0) throw new GatewayError(503, `every server of model '${target.model}' is drained`, 5)
      }
      pass.granted(lease.queuedMs)
      exchange.leased(assignment.name, lease.gpuIds, lease.queuedMs)
      let released = false
      const release = (): void => {
        if (released) return
        released = true
        exchange.released()
        void deps.leases.release(lease)
      }
      // Not released when the client leaves: the upstream may still be working on the GPUs
      // (a non-streamed answer, an image). Each way of using the lease says when it is done.
      return { assignment, lease, release }
    },
    /** The upstream was unreachable before it saw the request: sit it out, try the next. */
    unreachable (assignment: Assignment, error: unknown): void {
      round.unreachable(assignment, error)
      exchange.upstreamFailed(assignment.name, 'unreachable')
      deps.log.warn({ err: error, assignment: assignment.name }, 'upstream unreachable; trying the next candidate')
    },
    exhausted: () => round.exhausted()
  }
}
