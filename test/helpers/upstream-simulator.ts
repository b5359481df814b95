// The simulators live in scripts/simulator/ (npm run demo uses them too); tests import them from here.
export * from '../../scripts/simulator/upstream-simulator.js'
