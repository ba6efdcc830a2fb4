/*
 * dpe-test/kafdrop (images/test-kafdrop): written for this test image, not part of Kafdrop.
 * The message formats backed by Confluent's serializers (AVRO, PROTOBUF through a schema registry)
 * need libraries that only Confluent's own Maven repository serves; the test image is built from
 * Maven Central alone, so those formats answer this error instead.
 */
package kafdrop.util;

public final class ConfluentFormatUnavailable extends UnsupportedOperationException {
  public ConfluentFormatUnavailable(String format, String topicName) {
    super(format + " messages of topic " + topicName + " need Confluent's serializers, which dpe-test/kafdrop "
      + "is built without (Maven Central only); the DEFAULT, MSGPACK and PROTOBUF (descriptor file) formats work");
  }
}
