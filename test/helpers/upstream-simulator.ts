// The simulators live in scripts/simulator/ (npm run demo uses them too); tests import them from here.
export * from '../../scripts/simulator/upstream-simulator.js'
export * from '../../scripts/simulator/speech.js'
export { anthropicError } from '../../scripts/simulator/ollama-extras.js'
