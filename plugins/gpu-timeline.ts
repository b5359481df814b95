import fp from 'fastify-plugin'
import { GpuTimeline } from '../services/usage/gpu-timeline.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Each GPU's busy intervals over the last hour, from reads of the shared lease store (`GET /admin/gpu-timeline`). */
    gpuTimeline: GpuTimeline
  }
}

/** The store's status is read this often when the console's feed (which reads it more often) has not just read it. */
const READ_EVERY_MS = 1000

/**
 * Keeps the GPU timeline fed: the console's feed (plugins/fleet-events.ts) hands it every status
 * it reads while a page is open; otherwise this reads the status once a second, so the last hour
 * is known whether or not anyone watched it.
 */
export default fp(async function gpuTimeline (fastify) {
  const store = fastify.leases.store
  const timeline = new GpuTimeline()
  fastify.decorate('gpuTimeline', timeline)

  let reading = false
  const read = async (): Promise<void> => {
    const last = timeline.lastRead
    if (reading || (last !== undefined && Date.now() - last < READ_EVERY_MS * 0.9)) return
    reading = true
    try {
      const gpuIds = fastify.inventory.current.snapshot.gpus.map((g) => g.id)
      const status = await store.status(gpuIds)
      timeline.observe(Date.now(), gpuIds, status)
    } catch (err) {
      // the minutes without a read answer null (unknown), not idle
      fastify.log.debug({ err }, 'GPU timeline: lease store status not read')
    } finally {
      reading = false
    }
  }
  let timer: NodeJS.Timeout | undefined
  fastify.addHook('onReady', async () => {
    void read()
    timer = setInterval(() => { void read() }, READ_EVERY_MS)
    timer.unref()
  })
  // Runs before the lease store closes (onClose hooks run in reverse registration order).
  fastify.addHook('onClose', async () => { clearInterval(timer) })
}, { name: 'gpu-timeline', dependencies: ['gpu-lease', 'inventory'], fastify: '5.x' })
