import fp from 'fastify-plugin'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { Cooldowns } from '../services/leases/candidate-choice.js'
import { candidateLeases, type CandidateLeaseDeps, type CandidateLeases, type LeaseTarget } from '../services/leases/candidate-leases.js'
import { headerValue } from '../services/http/http-headers.js'
import { expectedWaitMs, ServiceTimes } from '../services/leases/expected-wait.js'
import { Scheduler } from '../services/scheduling/scheduler.js'
import type { Assignment } from '../services/fleet/inventory.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The assignments this replica found unreachable lately and sits out (the console shows them cooling down). */
    upstreamCooldowns: Cooldowns
    /**
     * The request's way through the model's candidates (404 / 503 drained when it has none; an
     * alias leased as its target, a fallback taken before any lease when the model cannot serve): each
     * `next()` admits the client once, leases the next candidate and names it in the reply's
     * `x-maestro-*` headers. Used by `forwardLeased` and `withLease`.
     */
    candidateLeases: (request: FastifyRequest, reply: FastifyReply, target: LeaseTarget) => CandidateLeases
  }
}

export default fp(async function candidateLeasesPlugin (fastify) {
  const serviceTimes = new ServiceTimes()
  const config = fastify.maestroConfig
  const waitOf = async (candidates: readonly Assignment[], queue: string): Promise<number> => {
    const status = await fastify.leases.store.status([...new Set(candidates.flatMap((a) => a.gpuIds))])
    return expectedWaitMs(status, candidates, queue, serviceTimes.of(queue))
  }
  // Scheduler v3 (CONTRACT 16): cost-ordered free candidates, bounded waits (late binding in the store) for the server holding a prefix or the model
  const scheduler = new Scheduler({
    affinity: fastify.scheduling.affinity,
    rates: fastify.scheduling.rates,
    warmAmong: (candidates, model) => fastify.upstreams.preferredAmong(candidates, model),
    isLoaded: (assignment, model) => fastify.upstreams.isLoaded(assignment, model),
    known: (assignment) => fastify.upstreams.snapshot(assignment.id)?.polledAt != null,
    maxWaitMs: config.affinityMaxWaitMs
  })
  const deps: CandidateLeaseDeps = {
    inventory: () => fastify.inventory.current,
    leases: fastify.leases,
    preferredAmong: (candidates, model) => fastify.upstreams.preferredAmong(candidates, model),
    cooldowns: new Cooldowns(),
    log: fastify.log,
    fallbackAfterMs: fastify.maestroConfig.fallbackAfterMs,
    expectedWaitMs: waitOf,
    held: (queue, heldMs) => { serviceTimes.note(queue, heldMs) },
    scheduler,
    decided: (seconds) => { fastify.metrics.scheduleDecision.observe(seconds) }
  }
  fastify.decorate('upstreamCooldowns', deps.cooldowns)

  fastify.decorate('candidateLeases', function (request: FastifyRequest, reply: FastifyReply, target: LeaseTarget): CandidateLeases {
    return candidateLeases(deps, {
      exchange: request.exchange,
      client: request.client,
      // plugins/clients.ts registers after this plugin: looked up on the request's path
      admit: () => fastify.admitClient(request, target.model, fastify.inventory.current.aliasTarget(target.model)),
      // admitted: from here the request is counted (plugins/usage.ts)
      admitted: () => { fastify.beginUsage(request, reply, target.model) },
      mayUse: (model) => fastify.clientLimits.allows(request.client, model),
      leased: (held) => {
        reply.header('x-maestro-assignment', headerValue(held.assignment.name))
        // The model that answers: the one asked for, an alias's target or a fallback (CONTRACT 17).
        reply.header('x-maestro-model', headerValue(held.model))
        reply.header('x-maestro-gpus', held.lease.gpuIds.join(','))
        reply.header('x-maestro-queue-ms', held.lease.queuedMs.toFixed(1))
        if (held.route !== undefined) reply.header('x-maestro-route', held.route)
        if (held.plan?.chose === true && target.prompt !== undefined && fastify.scheduling.affinity !== undefined) {
          fastify.metrics.affinity.inc({ result: held.plan.hit !== undefined ? 'hit' : 'miss' })
          const saved = scheduler.savedTokens(held.plan, held.assignment)
          if (saved > 0) fastify.metrics.prefillTokensSaved.inc(saved)
          fastify.scheduling.leased(held.assignment, held.model, target.prompt, held.plan.hit?.assignmentId === held.assignment.id)
        }
      }
    }, target)
  })
}, { name: 'candidate-leases', dependencies: ['config', 'errors', 'exchange', 'gpu-lease', 'inventory', 'metrics', 'scheduling', 'upstream-poller', 'usage'], fastify: '5.x' })
