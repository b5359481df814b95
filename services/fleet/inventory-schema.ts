/**
 * The inventory's records — computer, GPU, model, assignment, API key — as TypeBox schemas. Each
 * record's fields are defined once here and serve three readers: the admin API's bodies and
 * answers (routes/admin), the embedded-mode inventory file (services/fleet/inventory.ts) and the OpenAPI
 * document (generated from the routes' schemas). The file keeps its own, older key names for a few
 * fields (`vram`, `computer`, `gpus`, `parallel`); the field rules behind them are the same objects.
 *
 * A field's `description` is written to complete "must be ...", so error messages come from it.
 * No Fastify here.
 */
import { Type, type Static, type TProperties, type TSchema } from '@sinclair/typebox'
import { TypeCompiler } from '@sinclair/typebox/compiler'
import { ValueErrorType, type ValueError } from '@sinclair/typebox/errors'

/* ------------------------------------------------------------------------------------------ */
/* Fields                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/** File ids may be names; database ids are the tables' integers. Never anything that could act as part of a key. */
export const ID_PATTERN = /^[A-Za-z0-9._-]{1,100}$/

/**
 * The ranges of the original tables' numeric columns (docker/initdb/01-original-schema.sql): a
 * number outside its column's is refused by the schema (400 naming the field), not by MariaDB.
 */
export const INT_MAX = 2_147_483_647
/** FLOAT's largest magnitude as MariaDB takes it (3.4028235e38 is out of range already). */
export const FLOAT_MAX = 3.402823466e38

export const RecordId = Type.Union([
  Type.Integer({ minimum: 0, maximum: INT_MAX }),
  Type.String({ pattern: ID_PATTERN.source })
], { description: `a whole number or a string of letters, digits, '.', '_' or '-' (a number: from 0 to ${INT_MAX})` })

/** Names are VARCHAR(100) in the original tables. */
export const Name = Type.String({ minLength: 1, maxLength: 100, description: 'a non-empty string of at most 100 characters' })

/** A model name as stored (matched case-insensitively, `:latest` optional, when requests name it). */
export const ModelName = Type.String({ minLength: 1, maxLength: 100, description: 'a non-empty string of at most 100 characters (a model name)' })

/** IPv4, IPv6 or a host name; `normaliseAddress` (services/fleet/inventory.ts) has the last word. */
export const Address = Type.String({ minLength: 1, maxLength: 255, description: 'an IPv4 or IPv6 address or a host name' })

export const Port = Type.Integer({ minimum: 1, maximum: 65535, description: 'an integer from 1 to 65535' })

/** gpus.vram_size is a FLOAT. */
export const VramGb = Type.Number({ minimum: 0, maximum: FLOAT_MAX, description: `a number of at least 0 and at most ${FLOAT_MAX} (GB of memory)` })

/** gpus.weight is a FLOAT NULL; NULL counts as 0 when assignments are ranked (AVG(gpus.weight)). */
export const Weight = Type.Union([Type.Number({ minimum: -FLOAT_MAX, maximum: FLOAT_MAX }), Type.Null()], {
  description: `a number from -${FLOAT_MAX} to ${FLOAT_MAX} (or null)`
})

export const ModelKind = Type.Union([Type.Literal('llm'), Type.Literal('diffusor'), Type.Literal('speech')], {
  description: 'one of "llm", "diffusor", "speech"'
})

export const GpuIds = Type.Array(RecordId, { minItems: 1, maxItems: 64, description: 'a list of GPU ids, at least one, all on one computer' })

export const Parallel = Type.Integer({ minimum: 1, maximum: 1024, description: 'a whole number of at least 1 (requests the server runs at once; at most 1024)' })

export const Priority = Type.Union([Type.Literal('high'), Type.Literal('normal'), Type.Literal('low')], {
  description: 'one of "high", "normal", "low"'
})

/** Key names travel in URLs (`/admin/api-keys/:name`) and logs: a plain alphabet (the key store's KEY_NAME). */
export const KeyName = Type.String({ pattern: '^[A-Za-z0-9._-]{1,64}$', description: "a string of 1 to 64 letters, digits, '.', '_' or '-'" })

/** The key store's bounds (services/clients/api-keys.ts): its INT columns. */
const LIMIT_MAX = 1_000_000_000
const Count = (description: string, minimum: number): TSchema =>
  Type.Integer({ minimum, maximum: LIMIT_MAX, description: `${description}, at most ${LIMIT_MAX}` })

/* ------------------------------------------------------------------------------------------ */
/* Records (the admin API's names)                                                             */
/* ------------------------------------------------------------------------------------------ */

const computer = { id: RecordId, name: Name, ip: Address }
const gpu = { id: RecordId, name: Name, vramGb: VramGb, computerId: RecordId, weight: Weight }
const model = { kind: ModelKind, name: ModelName, size: Type.Number({ minimum: 0, description: 'a number of at least 0 (GB on disk; llms and diffusors only)' }) }
const assignment = {
  id: RecordId,
  name: Name,
  model: Type.String({ minLength: 1, maxLength: 100, description: "a non-empty string of at most 100 characters (a model name, or '*': any model of its kind that no other assignment names)" }),
  kind: ModelKind,
  port: Port,
  gpuIds: GpuIds,
  maxParallel: Parallel,
  drained: Type.Boolean({ description: 'true or false (a drained assignment takes no new lease)' })
}
const apiKey = {
  name: KeyName,
  priority: Priority,
  maxConcurrent: Count('an integer of at least 1 (requests in flight at once)', 1),
  maxQueued: Count('an integer of at least 1 (requests waiting at once)', 1),
  rpm: Count('an integer of at least 1 (requests per minute)', 1),
  models: Type.Array(Type.String({ minLength: 1, maxLength: 256 }), { maxItems: 1000, description: 'a list of at most 1000 model names the key may use' }),
  tokensPerDay: Type.Integer({ minimum: 1, maximum: 1e12, description: 'an integer from 1 to 10^12 (prompt + output tokens a UTC day)' }),
  tokensPerMonth: Type.Integer({ minimum: 1, maximum: 1e12, description: 'an integer from 1 to 10^12 (prompt + output tokens a UTC month)' })
}

/** Objects that name every field they allow: a misspelt field is an error, not silently ignored. */
const strict = <T extends TProperties>(properties: T, description?: string) =>
  Type.Object(properties, { additionalProperties: false, description })

export const ComputerRecord = strict(computer)
export type ComputerRecord = Static<typeof ComputerRecord>
export const ComputerCreate = strict({ name: computer.name, ip: computer.ip })
export const ComputerPatch = Type.Partial(ComputerCreate, { additionalProperties: false, minProperties: 1 })

export const GpuRecord = strict(gpu)
export type GpuRecord = Static<typeof GpuRecord>
export const GpuCreate = strict({ name: gpu.name, vramGb: gpu.vramGb, computerId: gpu.computerId, weight: Type.Optional(gpu.weight) })
export type GpuCreate = Static<typeof GpuCreate>
export const GpuPatch = Type.Partial(GpuCreate, { additionalProperties: false, minProperties: 1 })
export type GpuPatch = Static<typeof GpuPatch>

export const ModelRecord = strict({ kind: model.kind, name: model.name, size: Type.Optional(model.size) })
export type ModelRecord = Static<typeof ModelRecord>
export const ModelCreate = ModelRecord

export const AssignmentRecord = strict({
  id: assignment.id,
  name: assignment.name,
  model: assignment.model,
  kind: Type.Optional(assignment.kind),
  port: assignment.port,
  gpuIds: assignment.gpuIds,
  maxParallel: assignment.maxParallel,
  drained: assignment.drained
})
export type AssignmentRecord = Static<typeof AssignmentRecord>
/** `kind` only where the model is `'*'` in embedded mode (a table decides it otherwise). */
export const AssignmentCreate = strict({
  name: assignment.name,
  model: assignment.model,
  kind: Type.Optional(assignment.kind),
  port: assignment.port,
  gpuIds: assignment.gpuIds,
  maxParallel: Type.Optional(assignment.maxParallel)
})
export type AssignmentCreate = Static<typeof AssignmentCreate>
export const AssignmentPatch = Type.Partial(AssignmentCreate, { additionalProperties: false, minProperties: 1 })
export type AssignmentPatch = Static<typeof AssignmentPatch>

const keyLimits = {
  priority: Type.Optional(apiKey.priority),
  maxConcurrent: Type.Optional(apiKey.maxConcurrent),
  maxQueued: Type.Optional(apiKey.maxQueued),
  rpm: Type.Optional(apiKey.rpm),
  models: Type.Optional(apiKey.models),
  tokensPerDay: Type.Optional(apiKey.tokensPerDay),
  tokensPerMonth: Type.Optional(apiKey.tokensPerMonth)
}
// (no `format`: TypeBox's compiler knows no formats unless registered, and these only describe)
const Time = Type.String({ pattern: '^\\d{4}-\\d{2}-\\d{2}T', maxLength: 40, description: 'a time in ISO 8601 (2026-12-01T10:00:00.000Z)' })
/** A limit in a change or a file: null is no limit. */
const orNull = <T extends TSchema>(schema: T) => Type.Union([schema, Type.Null()], { description: `${schema.description as string} (or null: no limit)` })
const keyLimitsOrNull = {
  priority: Type.Optional(apiKey.priority),
  maxConcurrent: Type.Optional(orNull(apiKey.maxConcurrent)),
  maxQueued: Type.Optional(orNull(apiKey.maxQueued)),
  rpm: Type.Optional(orNull(apiKey.rpm)),
  models: Type.Optional(orNull(apiKey.models)),
  tokensPerDay: Type.Optional(orNull(apiKey.tokensPerDay)),
  tokensPerMonth: Type.Optional(orNull(apiKey.tokensPerMonth))
}
/** An API key as lists show it: never its secret, nor the secret's hash. */
export const ApiKeyRecord = strict({
  name: apiKey.name,
  source: Type.Union([Type.Literal('env'), Type.Literal('table'), Type.Literal('file')], { description: 'where the key is kept: API_KEYS, the api_keys table or the inventory file' }),
  ...keyLimits,
  usedToday: Type.Optional(Type.Integer({ minimum: 0, description: 'prompt + output tokens the key used this UTC day' })),
  usedThisMonth: Type.Optional(Type.Integer({ minimum: 0, description: 'prompt + output tokens the key used this UTC month' })),
  createdAt: Type.Optional(Time),
  revokedAt: Type.Optional(Time)
})
export type ApiKeyRecord = Static<typeof ApiKeyRecord>
export const ApiKeyCreate = strict({ name: apiKey.name, ...keyLimits })
export type ApiKeyCreate = Static<typeof ApiKeyCreate>
/** Fields given replace; a limit set to null is removed. */
export const ApiKeyPatch = Type.Partial(strict(keyLimitsOrNull), { additionalProperties: false, minProperties: 1 })
export type ApiKeyPatch = Static<typeof ApiKeyPatch>
/** The answer to a create: the only time the secret is shown. */
export const ApiKeyCreated = strict({ ...ApiKeyRecord.properties, key: Type.String({ description: 'the secret, shown this once' }) })

/* ------------------------------------------------------------------------------------------ */
/* The embedded-mode inventory file                                                            */
/* ------------------------------------------------------------------------------------------ */

export const FileComputer = strict(computer)
export const FileGpu = strict({
  id: gpu.id,
  name: Type.Optional(gpu.name),
  vram: Type.Optional(gpu.vramGb),
  computer: gpu.computerId,
  weight: Type.Optional(gpu.weight)
})
const ModelList = Type.Array(ModelName)
export const FileModels = strict({ llms: Type.Optional(ModelList), diffusors: Type.Optional(ModelList), speech: Type.Optional(ModelList) })
export const FileAssignment = strict({
  id: assignment.id,
  name: assignment.name,
  model: assignment.model,
  kind: Type.Optional(assignment.kind),
  port: assignment.port,
  gpus: assignment.gpuIds,
  parallel: Type.Optional(assignment.maxParallel),
  drained: Type.Optional(assignment.drained)
})
/* ------------------------------------------------------------------------------------------ */
/* Model aliases and fallbacks (CONTRACT 17)                                                   */
/* ------------------------------------------------------------------------------------------ */

export const AliasRecord = strict({
  alias: Type.String({ minLength: 1, maxLength: 100, description: 'a non-empty string of at most 100 characters (a name no model has)' }),
  model: ModelName
})
export type AliasRecord = Static<typeof AliasRecord>
export const FallbackList = Type.Array(ModelName, { maxItems: 16, description: 'a list of at most 16 model names or aliases, tried in order' })
export const FallbacksBody = strict({ fallbacks: FallbackList })
export const FallbacksRecord = strict({ model: ModelName, fallbacks: FallbackList })
export type FallbacksRecord = Static<typeof FallbacksRecord>

/** As the key store writes it (services/clients/api-keys.ts): the hash of the secret, never the secret. */
export const FileApiKey = strict({
  name: apiKey.name,
  sha256: Type.String({ pattern: '^[0-9a-fA-F]{64}$', description: "the key's SHA-256 in hex (64 characters; the file never holds the secret)" }),
  ...keyLimitsOrNull,
  createdAt: Type.Optional(Time),
  revokedAt: Type.Optional(Time)
})
export const InventoryFile = strict({
  computers: Type.Array(FileComputer),
  gpus: Type.Array(FileGpu),
  models: Type.Optional(FileModels),
  assignments: Type.Array(FileAssignment),
  apiKeys: Type.Optional(Type.Array(FileApiKey)),
  aliases: Type.Optional(Type.Record(Type.String({ minLength: 1, maxLength: 100 }), ModelName, {
    description: 'an object of alias → model name (an alias is a name of its own for one model)'
  })),
  fallbacks: Type.Optional(Type.Record(Type.String({ minLength: 1, maxLength: 100 }), FallbackList, {
    description: 'an object of model → its fallback models, in order'
  }))
})
export type InventoryFile = Static<typeof InventoryFile>
export type FileAssignment = Static<typeof FileAssignment>

const checkFile = TypeCompiler.Compile(InventoryFile)

/** Fields starting with `_` (comments) or `$` (`$schema`) are allowed anywhere and ignored. */
function withoutComments (v: unknown): unknown {
  if (Array.isArray(v)) return v.map(withoutComments)
  if (typeof v !== 'object' || v === null) return v
  const out: Record<string, unknown> = {}
  for (const [k, value] of Object.entries(v)) {
    if (!k.startsWith('_') && !k.startsWith('$')) out[k] = withoutComments(value)
  }
  return out
}

/**
 * Checks the file's shape against `InventoryFile` and answers it without its comment fields;
 * throws `<path> <what is wrong>` (`gpus[0].vram must be a number of at least 0 (got -1)`).
 * Cross-references (ids, names, GPUs) are the caller's to check.
 */
export function checkInventoryFile (json: unknown): InventoryFile {
  const value = withoutComments(json)
  if (checkFile.Check(value)) return value
  // An unknown field first: a misspelt one also makes the field it meant "missing".
  let first: ValueError | undefined
  let seen = 0
  for (const error of checkFile.Errors(value)) {
    first ??= error
    if (error.type === ValueErrorType.ObjectAdditionalProperties) { first = error; break }
    if (++seen >= 50) break
  }
  throw new Error(first == null ? 'the inventory is invalid' : explain(first))
}

/** `/gpus/0/vram` → `gpus[0].vram`; '' → 'the inventory'. */
export function fieldPath (pointer: string, root = 'the inventory'): string {
  if (pointer === '' || pointer === '/') return root
  return pointer.slice(1).split('/').map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'))
    .reduce((path, part) => /^\d+$/.test(part) ? `${path}[${part}]` : path === '' ? part : `${path}.${part}`, '')
}

/** One schema error as `<field> <what is wrong> (got <value>)`, the field named as `fieldPath` does. */
export function explain (error: ValueError, root = 'the inventory'): string {
  const path = fieldPath(error.path, root)
  const got = ` (got ${show(error.value)})`
  const schema = error.schema as TSchema & { type?: string, description?: string, properties?: Record<string, unknown>, minItems?: number }
  switch (error.type) {
    case ValueErrorType.ObjectAdditionalProperties: {
      const slash = error.path.lastIndexOf('/')
      const key = error.path.slice(slash + 1)
      const allowed = schema.properties == null ? '' : ` (expected ${Object.keys(schema.properties).join(', ')})`
      return `${fieldPath(error.path.slice(0, slash), root)} has unknown field ${JSON.stringify(key)}${allowed}`
    }
    case ValueErrorType.ObjectRequiredProperty:
      if (schema.type === 'array') return `${path} must be an array${got}`
      if (schema.type === 'object') return `${path} must be an object${got}`
      return `${path} must be ${schema.description ?? 'given'}${got}`
    case ValueErrorType.Object:
      return `${path} must be an object${got}`
    case ValueErrorType.Array:
      return `${path} must be an array${got}`
    case ValueErrorType.ArrayMinItems:
      return `${path} must name at least ${schema.minItems === undefined || schema.minItems === 1 ? 'one entry' : `${schema.minItems} entries`}`
    case ValueErrorType.ArrayMaxItems:
      return `${path} has too many entries${schema.description == null ? '' : ` (must be ${schema.description})`}`
    case ValueErrorType.ObjectMinProperties:
      return `${path} must name at least one field`
    default:
      return `${path} must be ${schema.description ?? error.message.replace(/^Expected /, '')}${got}`
  }
}

export function show (v: unknown): string {
  if (v === undefined) return 'nothing'
  if (Array.isArray(v)) return 'an array'
  if (v === null) return 'null'
  if (typeof v === 'object') return 'an object'
  const s = JSON.stringify(v)
  return s.length > 60 ? `${s.slice(0, 57)}...` : s
}
