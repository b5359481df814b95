import { Type, type Static } from '@sinclair/typebox'
import { SAFE_ID } from '../../services/leases/lease-store.js'
import { MODEL_NAME_MAX } from '../../services/fleet/model-name.js'

/** The original API's output types, each naming the kind of model it reserves. */
export const OutputType = Type.Union([Type.Literal('text'), Type.Literal('images'), Type.Literal('speech')], {
  description: 'text: an Ollama model (llms), images: a diffusion model (diffusors), speech: a speech model'
})
export type OutputType = Static<typeof OutputType>

export const ReserveRequest = Type.Object({
  outputType: OutputType,
  model: Type.String({ minLength: 1, maxLength: MODEL_NAME_MAX, description: 'model name, matched case-insensitively, `:latest` optional' })
})
export type ReserveRequest = Static<typeof ReserveRequest>

export const Reservation = Type.Object({
  name: Type.String({ description: 'assignment (upstream server) name' }),
  ip: Type.String(),
  port: Type.Integer(),
  gpuIds: Type.String({ description: 'the leased GPU ids, comma-separated' }),
  leaseId: Type.String({ description: 'for /gpu/ping and /gpu/release' }),
  expiresAt: Type.String({ format: 'date-time', description: 'when the reservation lapses unless pinged' })
})

/** GPU ids as numbers or strings (`[1]` or `["1"]`), never anything that could act as part of a key. */
const GpuId = Type.Union([
  Type.String({ pattern: SAFE_ID.source }),
  Type.Integer({ minimum: 0 })
])

/** Ping and release name one lease by id, or whatever leases hold the given GPUs (the original API). */
export const LeaseRef = Type.Object({
  leaseId: Type.Optional(Type.String({ minLength: 1, maxLength: 256 })),
  gpuIds: Type.Optional(Type.Array(GpuId, { minItems: 1, maxItems: 256 }))
})
export type LeaseRef = Static<typeof LeaseRef>

export const Message = Type.Object({ message: Type.String() })

const Time = Type.String({ format: 'date-time' })

export const GpuStatus = Type.Object({
  id: Type.String(),
  name: Type.String(),
  computer: Type.String(),
  leased: Type.Boolean(),
  slotsUsed: Type.Integer({ description: 'requests running on the GPU now (leases of the assignment that holds it)' }),
  capacity: Type.Integer({ description: 'parallel slots of the assignment running on the GPU (when free: of the assignments on it)' }),
  /** The fields below only while leased. */
  model: Type.Optional(Type.String({ description: 'the model as the lease holder asked for it' })),
  assignment: Type.Optional(Type.String({ description: 'assignment name' })),
  purpose: Type.Optional(Type.String({ description: "'proxy' (a request in flight) or 'reservation' (/gpu/reserve)" })),
  since: Type.Optional(Time),
  expiresAt: Type.Optional(Time)
})

export const FleetStatus = Type.Object({
  gpus: Type.Array(GpuStatus),
  /** Live waiters per queue, across every replica. */
  waiting: Type.Array(Type.Object({
    kind: Type.String(),
    model: Type.String({ description: 'the model key: lower case, without `:latest`' }),
    depth: Type.Integer(),
    oldestSince: Type.Optional(Type.String({ format: 'date-time', description: 'when the oldest of them arrived (absent when the store could not tell)' }))
  })),
  holds: Type.Array(Type.String(), { description: 'GPUs kept free for a request that has waited past STARVATION_MS' })
})
export type FleetStatus = Static<typeof FleetStatus>

export const CacheCleared = Type.Object({ removed: Type.Integer() })
