import { Type } from '@sinclair/typebox'
import { MODEL_NAME_MAX } from '../../services/fleet/model-name.js'

/** A model name as a request gives it: at most MODEL_NAME_MAX characters (names become queue names, log fields, metric labels). */
export const ModelName = (description = 'model name, matched case-insensitively, `:latest` optional') =>
  Type.String({ minLength: 1, maxLength: MODEL_NAME_MAX, description })

/**
 * What the gateway itself needs of an Ollama request: a JSON object naming a model. Every other
 * field is the upstream's business and is forwarded as sent, so the schema allows anything else.
 */
export const ModelRequest = Type.Object({
  model: ModelName()
}, { additionalProperties: true })

/** `/api/show` also accepts the legacy `name`. */
export const ShowRequest = Type.Object({
  model: Type.Optional(Type.String({ maxLength: MODEL_NAME_MAX })),
  name: Type.Optional(Type.String({ maxLength: MODEL_NAME_MAX }))
}, { additionalProperties: true })

export const ModelList = Type.Object({ models: Type.Array(Type.Object({}, { additionalProperties: true })) })
export const Version = Type.Object({ version: Type.String() })

/** `/api/pull`: `model` (or the legacy `name`); other fields are not passed on. */
export const PullRequest = Type.Object({
  // the same name fields as /api/show (and their limits)
  model: ShowRequest.properties.model,
  name: ShowRequest.properties.name,
  insecure: Type.Optional(Type.Boolean()),
  stream: Type.Optional(Type.Union([Type.Boolean(), Type.Null()]))
}, { additionalProperties: true })
