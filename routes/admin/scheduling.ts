import { Type } from '@sinclair/typebox'
import type { FastifyPluginAsync } from 'fastify'
import { AdminError } from './schemas.js'

const ServerWarmth = Type.Object({
  id: Type.String({ description: 'the assignment id' }),
  name: Type.String({ description: 'the assignment name' }),
  models: Type.Array(Type.String(), { description: 'the models loaded on its server (its last poll, then the gateway\'s own traffic)' }),
  conversations: Type.Integer({ minimum: 0, description: 'conversations whose last prompt it served, as the affinity map holds them (their next turn is routed here)' }),
  requests: Type.Integer({ minimum: 0, description: 'requests with a prompt fingerprint leased on it (since its counts last expired: AFFINITY_TTL_MS without one)' }),
  hits: Type.Integer({ minimum: 0, description: 'those of them the affinity map had sent there' }),
  hitRate: Type.Union([Type.Number({ minimum: 0, maximum: 1 }), Type.Null()], { description: 'hits / requests; null without requests' })
})

const SchedulingAnswer = Type.Object({
  affinity: Type.Boolean({ description: 'whether prompt-prefix affinity is on (AFFINITY_ENTRIES > 0); off, the counts are all 0' }),
  servers: Type.Array(ServerWarmth)
})

/**
 * `GET /admin/scheduling` (CONTRACT 16, the console's Servers table): what each LLM server holds
 * warm — its models, the conversations cached there, its affinity hit rate — from the state
 * scheduler v3 routes by: the poll's loaded models and the affinity map's counters
 * (services/scheduling/affinity-map.ts `warmth`: kept as entries are written, never a scan of the
 * map), shared by the replicas when the map is in Redis.
 */
const schedulingRoutes: FastifyPluginAsync = async (fastify) => {
  fastify.get('/admin/scheduling', {
    schema: {
      tags: ['admin: scheduling'],
      response: { 200: SchedulingAnswer, 401: AdminError },
      description: 'What each LLM server holds warm: its loaded models, the conversations cached there and its affinity hit rate.'
    },
    config: { auth: 'admin', errorStyle: 'ollama' }
  }, async () => {
    const affinity = fastify.scheduling.affinity
    const warmth = affinity !== undefined ? await affinity.warmth() : new Map()
    return {
      affinity: affinity !== undefined,
      servers: fastify.upstreams.snapshots().map((s) => {
        const w = warmth.get(s.assignmentId) ?? { conversations: 0, requests: 0, hits: 0 }
        return {
          id: s.assignmentId,
          name: s.assignment,
          models: s.loaded,
          conversations: w.conversations,
          requests: w.requests,
          hits: w.hits,
          hitRate: w.requests > 0 ? w.hits / w.requests : null
        }
      })
    }
  })
}

export default schedulingRoutes
