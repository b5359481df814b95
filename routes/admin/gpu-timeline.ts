import { Type } from '@sinclair/typebox'
import type { FastifyPluginAsync } from 'fastify'
import { AdminError } from './schemas.js'

const GpuTimelineRow = Type.Object({
  id: Type.String(),
  name: Type.String(),
  computer: Type.String({ description: 'the name of its computer' }),
  busy: Type.Array(Type.Union([Type.Number({ minimum: 0, maximum: 1 }), Type.Null()]), {
    description: 'per minute, oldest first: the share of it the GPU held a lease (0 to 1); null where this replica did not read the lease store'
  })
})

const GpuTimelineAnswer = Type.Object({
  from: Type.String({ description: 'start of the first minute, ISO time (UTC)' }),
  to: Type.String({ description: 'the last read of the lease store, ISO time: the last minute counts up to here' }),
  bucketSeconds: Type.Number({ description: 'the length of one entry of busy: 60' }),
  observedSince: Type.Union([Type.String(), Type.Null()], { description: 'the oldest read of the lease store still in the hour (a replica that started since knows no more)' }),
  gpus: Type.Array(GpuTimelineRow)
})

const iso = (ms: number): string => new Date(ms).toISOString()

/**
 * `GET /admin/gpu-timeline` (CONTRACT 17, the console's Usage view): each GPU's busy share per
 * minute over the last hour, from this replica's reads of the shared lease store
 * (services/usage/gpu-timeline.ts), so any replica answers for the whole fleet.
 */
const gpuTimelineRoutes: FastifyPluginAsync = async (fastify) => {
  fastify.get('/admin/gpu-timeline', {
    schema: {
      tags: ['admin: usage'],
      response: { 200: GpuTimelineAnswer, 401: AdminError },
      description: 'Each GPU\'s busy share per minute over the last hour (60 entries, the last one the minute under way).'
    },
    config: { auth: 'admin', errorStyle: 'ollama' }
  }, async () => {
    const read = fastify.gpuTimeline.read(Date.now())
    const unknown = new Array<null>(read.buckets).fill(null)
    return {
      from: iso(read.from),
      to: iso(read.to),
      bucketSeconds: read.bucketMs / 1000,
      observedSince: read.observedSince === undefined ? null : iso(read.observedSince),
      gpus: fastify.inventory.current.snapshot.gpus.map((g) => ({
        id: g.id,
        name: g.name,
        computer: g.computerName,
        busy: read.busy.get(g.id) ?? unknown
      }))
    }
  })
}

export default gpuTimelineRoutes
