import { Type } from '@sinclair/typebox'
import {
  AliasRecord, ApiKeyRecord, AssignmentRecord, FallbacksRecord, ComputerRecord, GpuRecord, ID_PATTERN, KeyName, ModelKind, ModelName, ModelRecord
} from '../../services/fleet/inventory-schema.js'

export {
  AliasRecord, FallbacksBody, FallbacksRecord, ApiKeyCreate, ApiKeyCreated, ApiKeyPatch, ApiKeyRecord, AssignmentCreate, AssignmentPatch, AssignmentRecord, ComputerCreate, ComputerPatch, ComputerRecord,
  GpuCreate, GpuPatch, GpuRecord, ModelCreate, ModelRecord
} from '../../services/fleet/inventory-schema.js'

/** `/admin/<records>/:id`: the table's id (a file may also use names). */
export const IdParams = Type.Object({
  id: Type.String({ pattern: ID_PATTERN.source, description: "a record id: a whole number (or, in a file, letters, digits, '.', '_' or '-')" })
})

export const ModelParams = Type.Object({ kind: ModelKind, name: ModelName })

export const KeyParams = Type.Object({ name: KeyName })
export const ApiKeys = Type.Array(ApiKeyRecord)

export const Computers = Type.Array(ComputerRecord)
export const Gpus = Type.Array(GpuRecord)
export const Models = Type.Array(ModelRecord)
export const Assignments = Type.Array(AssignmentRecord)

export const AdminError = Type.Object({ error: Type.String() })

export const AliasCreate = AliasRecord
export const Aliases = Type.Array(AliasRecord)
export const FallbacksList = Type.Array(FallbacksRecord)
/** `/admin/aliases/*`, `/admin/fallbacks/*`: a model name or an alias, slashes and all. */
export const NameParams = Type.Object({ '*': Type.String({ minLength: 1, maxLength: 100, description: 'a model name or an alias' }) })

/** A delete's answer: nothing. */
export const Deleted = Type.Null({ description: 'deleted (no body)' })

/** The answers every admin write may give besides its own. */
export const errorAnswers = {
  400: AdminError,
  401: AdminError,
  404: AdminError,
  409: AdminError
}
