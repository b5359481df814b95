import type { FastifyPluginAsync, FastifyReply } from 'fastify'
import { GatewayError } from '../../services/http/errors.js'
import * as rules from '../../services/fleet/fleet-rules.js'
import type { AssignmentRecord } from '../../services/fleet/inventory-schema.js'
import type { ModelKind } from '../../services/fleet/inventory.js'
import {
  AssignmentCreate, AssignmentPatch, AssignmentRecord as AssignmentSchema, Assignments, ComputerCreate, ComputerPatch,
  ComputerRecord, Computers, Deleted, errorAnswers, GpuCreate, GpuPatch, GpuRecord, Gpus, IdParams, ModelCreate, ModelParams,
  ModelRecord, Models
} from './schemas.js'

/** Every admin route needs the admin token when ADMIN_TOKEN is set (plugins/auth.ts). */
const adminOnly = { auth: 'admin', errorStyle: 'ollama' } as const

type IdRequest = { Params: { id: string } }

/**
 * The admin API (CONTRACT section 13): computers, GPUs, models and assignments, each change one
 * transaction (or one atomic file write), used by every replica within a second. The rules live in
 * services/fleet/fleet-rules.ts, the storage in services/fleet/fleet-store.ts.
 */
const fleetRoutes: FastifyPluginAsync = async (fastify) => {
  const store = fastify.fleetStore
  const leases = fastify.leases.store

  const context: rules.RuleContext = {
    // Tables list every model, '*' included; a file lists named models and gives '*' assignments a kind.
    modelsInTables: store.source === 'mariadb',
    async inFlight (assignment: AssignmentRecord) {
      const status = await leases.status(assignment.gpuIds.map(String)).catch((err: unknown) => {
        fastify.log.warn({ err }, 'lease store call failed')
        throw new GatewayError(503, 'lease store unavailable: cannot tell whether requests are in flight', 1)
      })
      return new Set(status.gpus.filter((g) => g.assignmentId === String(assignment.id)).map((g) => g.token)).size
    }
  }

  /** Stores one change, then has every replica read the inventory again. */
  const change = async <T>(work: (fleet: rules.Fleet) => Promise<T> | T): Promise<T> => {
    const result = await store.change(work)
    try {
      await fastify.inventoryChanged()
    } catch (err) {
      // Stored; replicas that were not told see it at their next refresh (INVENTORY_REFRESH_MS).
      fastify.log.warn({ err }, 'inventory changed, but not every replica could be told at once')
    }
    return result
  }
  const read = async (): Promise<rules.Fleet> => await store.read()
  const created = <T>(reply: FastifyReply, record: T): T => { reply.code(201); return record }
  const gone = (reply: FastifyReply): FastifyReply => reply.code(204).send()

  const schema = (extra: Record<string, unknown>, tag: string): Record<string, unknown> => ({ tags: [tag], ...extra })

  /* computers -------------------------------------------------------------------------------- */
  const computer = { tag: 'admin: computers' }
  fastify.get('/admin/computers', { schema: schema({ response: { 200: Computers } }, computer.tag), config: adminOnly },
    async () => (await read()).computers)
  fastify.post<{ Body: { name: string, ip: string } }>('/admin/computers',
    { schema: schema({ body: ComputerCreate, response: { 201: ComputerRecord, ...errorAnswers } }, computer.tag), config: adminOnly },
    async (request, reply) => created(reply, await change((f) => rules.createComputer(f, request.body))))
  fastify.get<IdRequest>('/admin/computers/:id', { schema: schema({ params: IdParams, response: { 200: ComputerRecord, ...errorAnswers } }, computer.tag), config: adminOnly },
    async (request) => rules.getComputer(await read(), request.params.id))
  fastify.patch<IdRequest & { Body: { name?: string, ip?: string } }>('/admin/computers/:id',
    { schema: schema({ params: IdParams, body: ComputerPatch, response: { 200: ComputerRecord, ...errorAnswers } }, computer.tag), config: adminOnly },
    async (request) => await change((f) => rules.updateComputer(f, request.params.id, request.body)))
  fastify.delete<IdRequest>('/admin/computers/:id', { schema: schema({ params: IdParams, response: { 204: Deleted, ...errorAnswers } }, computer.tag), config: adminOnly },
    async (request, reply) => { await change((f) => rules.deleteComputer(f, request.params.id)); return gone(reply) })

  /* gpus ------------------------------------------------------------------------------------- */
  const gpu = { tag: 'admin: GPUs' }
  fastify.get('/admin/gpus', { schema: schema({ response: { 200: Gpus } }, gpu.tag), config: adminOnly },
    async () => (await read()).gpus)
  fastify.post<{ Body: GpuCreate }>('/admin/gpus',
    { schema: schema({ body: GpuCreate, response: { 201: GpuRecord, ...errorAnswers } }, gpu.tag), config: adminOnly },
    async (request, reply) => created(reply, await change((f) => rules.createGpu(f, request.body))))
  fastify.get<IdRequest>('/admin/gpus/:id', { schema: schema({ params: IdParams, response: { 200: GpuRecord, ...errorAnswers } }, gpu.tag), config: adminOnly },
    async (request) => rules.getGpu(await read(), request.params.id))
  fastify.patch<IdRequest & { Body: GpuPatch }>('/admin/gpus/:id',
    { schema: schema({ params: IdParams, body: GpuPatch, response: { 200: GpuRecord, ...errorAnswers } }, gpu.tag), config: adminOnly },
    async (request) => await change((f) => rules.updateGpu(f, request.params.id, request.body)))
  fastify.delete<IdRequest>('/admin/gpus/:id', { schema: schema({ params: IdParams, response: { 204: Deleted, ...errorAnswers } }, gpu.tag), config: adminOnly },
    async (request, reply) => { await change((f) => rules.deleteGpu(f, request.params.id)); return gone(reply) })

  /* models ----------------------------------------------------------------------------------- */
  const model = { tag: 'admin: models' }
  fastify.get('/admin/models', { schema: schema({ response: { 200: Models } }, model.tag), config: adminOnly },
    async () => (await read()).models)
  fastify.post<{ Body: ModelRecord }>('/admin/models',
    { schema: schema({ body: ModelCreate, response: { 201: ModelRecord, ...errorAnswers } }, model.tag), config: adminOnly },
    async (request, reply) => created(reply, await change((f) => rules.createModel(f, request.body, context))))
  fastify.delete<{ Params: { kind: ModelKind, name: string } }>('/admin/models/:kind/:name',
    { schema: schema({ params: ModelParams, response: { 204: Deleted, ...errorAnswers } }, model.tag), config: adminOnly },
    async (request, reply) => { await change((f) => rules.deleteModel(f, request.params.kind, request.params.name)); return gone(reply) })

  /* assignments ------------------------------------------------------------------------------ */
  const assignment = { tag: 'admin: assignments' }
  fastify.get('/admin/assignments', { schema: schema({ response: { 200: Assignments } }, assignment.tag), config: adminOnly },
    async () => (await read()).assignments)
  fastify.post<{ Body: AssignmentCreate }>('/admin/assignments',
    { schema: schema({ body: AssignmentCreate, response: { 201: AssignmentSchema, ...errorAnswers } }, assignment.tag), config: adminOnly },
    async (request, reply) => created(reply, await change((f) => rules.createAssignment(f, request.body, context))))
  fastify.get<IdRequest>('/admin/assignments/:id', { schema: schema({ params: IdParams, response: { 200: AssignmentSchema, ...errorAnswers } }, assignment.tag), config: adminOnly },
    async (request) => rules.getAssignment(await read(), request.params.id))
  fastify.patch<IdRequest & { Body: AssignmentPatch }>('/admin/assignments/:id',
    { schema: schema({ params: IdParams, body: AssignmentPatch, response: { 200: AssignmentSchema, ...errorAnswers } }, assignment.tag), config: adminOnly },
    async (request) => await change(async (f) => await rules.updateAssignment(f, request.params.id, request.body, context)))
  fastify.delete<IdRequest>('/admin/assignments/:id', { schema: schema({ params: IdParams, response: { 204: Deleted, ...errorAnswers } }, assignment.tag), config: adminOnly },
    async (request, reply) => { await change(async (f) => { await rules.deleteAssignment(f, request.params.id, context) }); return gone(reply) })
  for (const [action, drained] of [['drain', true], ['undrain', false]] as const) {
    fastify.post<IdRequest>(`/admin/assignments/:id/${action}`, {
      schema: schema({
        params: IdParams,
        response: { 200: AssignmentSchema, ...errorAnswers },
        description: drained
          ? 'The assignment takes no new lease from now on (on every replica within a second); requests it is serving finish.'
          : 'The assignment takes leases again.'
      }, assignment.tag),
      config: adminOnly
    }, async (request) => await change((f) => rules.setDrained(f, request.params.id, drained)))
  }
}

export default fleetRoutes
