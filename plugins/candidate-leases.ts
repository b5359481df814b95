import fp from 'fastify-plugin'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { Cooldowns } from '../services/leases/candidate-choice.js'
import { candidateLeases, type CandidateLeaseDeps, type CandidateLeases, type LeaseTarget } from '../services/leases/candidate-leases.js'
import { headerValue } from '../services/http/http-headers.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The assignments this replica found unreachable lately and sits out (the console shows them cooling down). */
    upstreamCooldowns: Cooldowns
    /**
     * The request's way through the model's candidates (404 / 503 drained when it has none): each
     * `next()` admits the client once, leases the next candidate and names it in the reply's
     * `x-maestro-*` headers. Used by `forwardLeased` and `withLease`.
     */
    candidateLeases: (request: FastifyRequest, reply: FastifyReply, target: LeaseTarget) => CandidateLeases
  }
}

export default fp(async function candidateLeasesPlugin (fastify) {
  const deps: CandidateLeaseDeps = {
    inventory: () => fastify.inventory.current,
    leases: fastify.leases,
    preferredAmong: (candidates, model) => fastify.upstreams.preferredAmong(candidates, model),
    cooldowns: new Cooldowns(),
    log: fastify.log
  }
  fastify.decorate('upstreamCooldowns', deps.cooldowns)

  fastify.decorate('candidateLeases', function (request: FastifyRequest, reply: FastifyReply, target: LeaseTarget): CandidateLeases {
    const leases = candidateLeases(deps, {
      exchange: request.exchange,
      client: { id: request.client.id, priority: request.client.priority },
      // plugins/clients.ts registers after this plugin: looked up on the request's path
      admit: async () => await fastify.admitClient(request, target.model)
    }, target)
    return {
      ...leases,
      async next () {
        const held = await leases.next()
        if (held != null) {
          reply.header('x-maestro-assignment', headerValue(held.assignment.name))
          reply.header('x-maestro-gpus', held.lease.gpuIds.join(','))
          reply.header('x-maestro-queue-ms', held.lease.queuedMs.toFixed(1))
        }
        return held
      }
    }
  })
}, { name: 'candidate-leases', dependencies: ['errors', 'exchange', 'gpu-lease', 'inventory', 'upstream-poller'], fastify: '5.x' })
