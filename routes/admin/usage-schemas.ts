import { Type } from '@sinclair/typebox'

/** `from` and `to`: an ISO date, or date and time (UTC unless an offset says otherwise). */
const ISO_TIME = 'ISO 8601 date or date-time, e.g. 2025-01-31 or 2025-01-31T10:00:00Z'
const isoTime = (description: string): ReturnType<typeof Type.String> => Type.String({ maxLength: 40, description: `${ISO_TIME}${description}` })

export const UsageQuerystring = Type.Object({
  from: Type.Optional(isoTime('; default: 24 hours before to')),
  to: Type.Optional(isoTime(', exclusive; default: now')),
  groupBy: Type.Optional(Type.String({
    maxLength: 100,
    description: 'client, model, assignment or hour; several comma-separated (hour,client) for a row per combination; default: client'
  }))
})

const count = (description: string): ReturnType<typeof Type.Number> => Type.Number({ description })

export const UsageRow = Type.Object({
  client: Type.Optional(Type.String({ description: 'API key name, else address' })),
  model: Type.Optional(Type.String()),
  assignment: Type.Optional(Type.String()),
  hour: Type.Optional(Type.String({ description: 'start of the hour, ISO time (UTC)' })),
  requests: count('requests answered'),
  promptTokens: count('prompt tokens, cached ones included'),
  cachedPromptTokens: count('of the prompt tokens, those the server had cached'),
  outputTokens: count('tokens generated'),
  images: count('images generated'),
  audioSeconds: count('seconds of audio transcribed or spoken'),
  gpuSeconds: count('seconds a GPU lease was held'),
  errors: count('requests that ended in an error')
})

export const UsageAnswer = Type.Object({ rows: Type.Array(UsageRow) })
