import { Type } from '@sinclair/typebox'
import { ModelName } from '../ollama/schemas.js'

/**
 * `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: the gateway needs only the model;
 * every other field is the upstream's business and is forwarded exactly as sent.
 */
export { ModelRequest } from '../ollama/schemas.js'

/**
 * `/v1/images/generations`, OpenAI's fields as far as a Stable Diffusion server can honour them.
 * Other fields (e.g. `num_inference_steps`) are passed on to `/txt2img` as sent.
 */
export const ImageGenerationRequest = Type.Object({
  model: ModelName('a diffusion model with an assignment'),
  prompt: Type.String({ minLength: 1 }),
  n: Type.Optional(Type.Integer({ minimum: 1, maximum: 10, description: 'images to make, one /txt2img call each (default 1)' })),
  size: Type.Optional(Type.String({ pattern: '^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$', description: '"WIDTHxHEIGHT", passed on as width and height' })),
  response_format: Type.Optional(Type.Union([Type.Literal('b64_json'), Type.Literal('url')], { description: 'only b64_json: the gateway stores no images' }))
}, { additionalProperties: true })

export const Model = Type.Object({
  id: Type.String(),
  object: Type.Literal('model'),
  created: Type.Integer({ description: 'unix seconds the upstream last modified the model, 0 when unknown' }),
  owned_by: Type.String()
})

export const ModelList = Type.Object({
  object: Type.Literal('list'),
  data: Type.Array(Model)
})
